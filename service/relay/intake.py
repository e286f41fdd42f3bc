"""Intake: reads the input topic, validates each record, admits events into batches
(or holds them back behind an unfinished change to their codes) and hands full or
due batches to the uploaders.

It owns the input consumer, the offset book, the batcher and the order guard, the
pause state and the input partitions' rebalances. Others reach it only through
its inbox, read at every poll: the ledger view reports tasks recorded and
ended, the uploaders report rejected batches.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Final, Protocol

import structlog
from aiokafka import ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError

from service.core.batching import Batch, Done, PendingEvent, Source, unsent_part
from service.core.contract import ParsedEvent, Rejection, parse_event
from service.core.offsets import METADATA_PREFIX, decode_progress, progress_digest
from service.core.records import DeadLetterHeaders
from service.kafka import UndecodableRecordsError
from service.metrics import RelayMetrics
from service.relay.admission import Admission
from service.relay.book import OffsetBook
from service.relay.config import RelayConfig, utcnow
from service.relay.health import ApiHealth
from service.relay.intents import IntentWatch, LedgerTasks
from service.relay.messages import (
    BatchAbandoned,
    BatchRejected,
    DeadLetter,
    Flush,
    IntakeMessage,
    IntentClosed,
    IntentOpened,
    LedgerCaughtUp,
    Mailbox,
    Resolution,
    TaskEnded,
    TaskRecorded,
)
from service.relay.ports import FetchedRecord, GroupOffsets, InputConsumer
from service.relay.stopped import STEP_RECORDS, StoppedPartitions

log = structlog.get_logger(__name__)

POLL_MS: Final = 100
MAX_RECORDS: Final = 2000
# A full poll is tens of milliseconds of judging and batching: intake lets the other
# stages run every this many records, so an upload's slot (used only within 10 ms of
# its start, service/core/slots.py) and the committer are not kept waiting behind it.
YIELD_EVERY_RECORDS: Final = 64
# How often, at most, a commit is asked for only to pass transaction markers.
MARKER_COMMIT_EVERY_S: Final = 1.0
# How often intake looks again at a due batch that waits for a free uploader.
LINGER_RECHECK_MS: Final = 20
# While the upload queue is full, intake polls Kafka (partitions paused) this often, well
# inside max.poll.interval.ms.
QUEUE_KEEPALIVE_S: Final = 1.0
# How often intake asks again where the ledger ends when it could not at an assignment.
LEDGER_END_RETRY_S: Final = 1.0


class UploadQueue(Protocol):
    """The uploaders' queue, as intake sees it."""

    async def put(self, batch: Batch | Resolution) -> None:
        """Queue a batch (or an intent to resolve); waits for room."""

    @property
    def idle(self) -> bool:
        """Nothing queued: an uploader would take a batch at once."""

    def take_queued(self) -> list[Batch]:
        """Take back every batch not yet started (a rebalance)."""


class LedgerSync(Protocol):
    """The ledger view, as intake waits for it at an assignment."""

    async def end_offsets(self) -> dict[int, int]:
        """Where each ledger partition ends now, open transactions included."""

    def reached(self, ends: dict[int, int]) -> bool:
        """Whether the view has read and told every partition up to `ends`."""

    def stopped(self) -> bool:
        """Whether a ledger partition is stopped at a record batch it cannot decode."""

    def progress(self, topic: str, partition: int) -> bytes | None:
        """The latest progress record of an input partition the view has read."""


class CommitQueue(Protocol):
    """The committer, as intake sees it."""

    async def submit(self, item: DeadLetter | Flush) -> None:
        """Queue a dead letter (or a request to commit soon) for the next transaction."""

    async def flush(self) -> None:
        """Wait until everything queued so far is committed."""

    async def flush_and_hold(self) -> None:
        """Commit what is queued, then start no transaction until `resume`."""

    def hold(self) -> None:
        """Start no new transaction until `resume` (a rebalance is under way)."""

    def resume(self) -> None:
        """Commit again after a hold."""


class Intake:
    """The input side of the relay: consume, validate, admit, batch, hand on."""

    def __init__(
        self,
        config: RelayConfig,
        *,
        consumer: InputConsumer,
        group_offsets: GroupOffsets,
        inbox: Mailbox[IntakeMessage],
        admission: Admission,
        book: OffsetBook,
        uploaders: UploadQueue,
        committer: CommitQueue,
        health: ApiHealth,
        metrics: RelayMetrics,
        clock: Callable[[], float],
        ledger: LedgerSync | None = None,
        generation: Callable[[], int | None] = lambda: None,
    ) -> None:
        self._config = config
        self._ledger = ledger
        self._generation = generation
        # Partitions assigned whose progress record is applied once the ledger view has
        # read to where the ledger ended at the assignment.
        self._awaiting_progress: set[TopicPartition] = set()
        # Where the ledger ended could not be asked at the assignment: asked again, and
        # the partitions stay paused until it is known and read to (`_pause_reason`).
        self._ledger_end_unknown = False
        self._ledger_end_asked_at = 0.0
        self._ledger_target: dict[int, int] | None = None
        self._assigning = False
        self._revoking = False
        self._intents = IntentWatch()
        self._consumer = consumer
        self._group_offsets = group_offsets
        self._admission = admission
        self._book = book
        self._uploaders = uploaders
        self._committer = committer
        self._health = health
        self._metrics = metrics
        self._clock = clock
        self._inbox = inbox
        # A commit point moved with no record of the relay's to carry it (past transaction
        # markers, or past events skipped as done): not yet committed.
        self._commit_point_moved = False
        self._markers_committed_at = float("-inf")
        self._ledger_read = False
        self._ledger_tasks = LedgerTasks()
        self._paused = False
        self._last_poll = 0.0
        self._rebalances = 0
        self._unsent: list[Batch] = []  # not queued when the stop came: flushed at shutdown
        # The offset after the last record taken (or the commit point), per partition: where
        # a partition is read again after an undecodable batch (service/relay/stopped.py).
        self._next_offset: dict[TopicPartition, int] = {}
        self._stopped = StoppedPartitions("input", metrics.partition_stopped, clock)

    def rebalance_listener(self) -> ConsumerRebalanceListener:
        """The listener to subscribe the input consumer with."""
        return _InputRebalance(self)

    @property
    def paused(self) -> bool:
        """Whether the input partitions are paused."""
        return self._paused

    def stopped_reasons(self) -> list[str]:
        """Input partitions stopped at a record batch that cannot be decoded (readiness)."""
        return self._stopped.reasons()

    @property
    def buffered_values(self) -> int:
        """Values read but not yet in a recorded task: open batches, held events, and
        batches queued or being uploaded."""
        return self._admission.buffered_values + self._book.in_flight_values

    async def run(self, stop: asyncio.Event) -> list[Batch]:
        """Consume until `stop` is set; returns the batches left to flush at shutdown."""
        while not stop.is_set():
            await self._read_inbox(stop)
            if self._ledger_end_unknown:
                await self._ask_ledger_end_again()
            self._update_pause()
            # Before the poll: records a poll returns across a rebalance are read again
            # from where the new assignment starts, never taken into the new epoch.
            epoch = self._rebalances
            try:
                batches = await self._poll(stop)
            except UndecodableRecordsError as error:
                self._last_poll = self._clock()
                self._undecodable(error)
                continue
            self._last_poll = self._clock()
            if epoch != self._rebalances:
                self._unread(batches)
                continue
            consumed = 0
            every_record_taken = True
            for record in (r for records in batches.values() for r in records):
                if consumed and consumed % YIELD_EVERY_RECORDS == 0:
                    await asyncio.sleep(0)
                if stop.is_set() or epoch != self._rebalances:
                    # Records not processed are not tracked: read again from the commit.
                    every_record_taken = False
                    break
                consumed += 1
                # Taking a record never waits; only what it leads to may (a full batch to
                # queue, a dead letter to hand the committer).
                taken = self._take(record)
                if isinstance(taken, DeadLetter):
                    taken.owner = self._book.token(taken.source.topic, taken.source.partition)
                    await self._committer.submit(taken)
                else:
                    for batch in taken:
                        await self._send(batch, stop)
            self._metrics.events_consumed.inc(consumed)
            if every_record_taken:
                self._taken_to(batches)
                if consumed < MAX_RECORDS:
                    await self._pass_markers(epoch)
            # Linger-due batches go only when an uploader is free to take them at once;
            # until then they keep filling (full ones are queued regardless).
            if self._uploaders.idle:
                for batch in self._admission.due(self._clock(), limit=1):
                    await self._send(batch, stop)
        log.info("relay_stopping", open_batches=self._admission.open_batches)
        flushed = self._admission.drain()
        for batch in flushed:
            # Flushed at shutdown: handed on under the partitions still owned (the
            # consumer lets go of them only after the uploaders have drained).
            self._book.handed_on(batch)
        return [*self._unsent, *flushed]

    def _unread(self, batches: Mapping[TopicPartition, Sequence[FetchedRecord]]) -> None:
        """A poll returned across a rebalance: none of its records is taken. Partitions
        assigned now are sought back to its first record (the consumer moved past them;
        its records start where the new assignment positioned it), the others are not
        this intake's any more."""
        assigned = set(self._consumer.assignment())
        for tp, records in batches.items():
            if records and tp in assigned:
                self._consumer.seek(tp, records[0].offset)

    def _taken_to(self, batches: Mapping[TopicPartition, Sequence[FetchedRecord]]) -> None:
        """Every record of a poll was taken: each partition is read up to its last one."""
        for tp, records in batches.items():
            if records:
                read_to = records[-1].offset + 1
                self._next_offset[tp] = read_to
                self._stopped.read_past(tp, read_to)

    async def _poll(self, stop: asyncio.Event) -> Mapping[TopicPartition, Sequence[FetchedRecord]]:
        """The next records of every readable partition. Partitions that met a record batch
        they cannot decode are read one record per call first (see `_step`) and left out."""
        stepping = self._stopped.stepping() if self._stopped and not self._paused else []
        if not stepping:
            return await self._consumer.getmany(
                timeout_ms=self._poll_timeout_ms(), max_records=MAX_RECORDS
            )
        readable = [tp for tp in self._consumer.assignment() if tp not in self._stopped]
        await self._step(stepping, stop, 0 if readable else self._poll_timeout_ms())
        if not readable:
            return {}
        return await self._consumer.getmany(
            *readable, timeout_ms=self._poll_timeout_ms(), max_records=MAX_RECORDS
        )

    async def _step(
        self, stepping: list[TopicPartition], stop: asyncio.Event, wait_ms: int
    ) -> None:
        """Read these partitions one record per call, up to the batch they cannot decode:
        aiokafka decodes a batch only when asked for its first record, so every record
        before it is taken (and may be committed), and the partition then pauses exactly
        at the batch (service/relay/stopped.py)."""
        epoch = self._rebalances
        for tp in stepping:
            for _ in range(STEP_RECORDS):
                if stop.is_set() or epoch != self._rebalances:
                    return
                try:
                    fetched = await self._consumer.getmany(tp, timeout_ms=wait_ms, max_records=1)
                except UndecodableRecordsError as error:
                    if error.partition is None:  # asked for this partition alone
                        error = UndecodableRecordsError(tp, error.offset, error.cause)
                    self._undecodable(error)
                    break
                finally:
                    self._last_poll = self._clock()
                wait_ms = 0
                if epoch != self._rebalances:
                    self._unread(fetched)
                    return
                records = fetched.get(tp)
                if not records:
                    break
                (record,) = records
                self._metrics.events_consumed.inc()
                self._next_offset[tp] = record.offset + 1
                self._stopped.read_past(tp, record.offset + 1)
                taken = self._take(record)
                if isinstance(taken, DeadLetter):
                    taken.owner = self._book.token(taken.source.topic, taken.source.partition)
                    await self._committer.submit(taken)
                else:
                    for batch in taken:
                        await self._send(batch, stop)
                if tp not in self._stopped:
                    break  # read past the batch: it decodes now

    def _undecodable(self, error: UndecodableRecordsError) -> None:
        """A record batch could not be decoded: its partition (every partition, if aiokafka
        did not say which) steps up to it or pauses, and every partition is read again
        from the last record taken: aiokafka lost the records it drained in the failed
        call, and moved their positions past them."""
        assigned = set(self._consumer.assignment())
        if error.partition is None:
            failed = sorted(assigned)
        else:
            failed = [error.partition] if error.partition in assigned else []
        for tp in failed:
            offset = error.offset if error.partition is not None else None
            self._stopped.failed(tp, offset, error.cause, self._next_offset.get(tp))
        for tp in assigned:
            read_to = self._next_offset.get(tp)
            if read_to is not None:
                self._consumer.seek(tp, read_to)
        paused = [tp for tp in failed if tp in self._stopped.paused()]
        if paused:
            self._consumer.pause(*paused)

    async def _pass_markers(self, epoch: int) -> None:
        """Caught up (the last poll was not full, and every record it returned is taken):
        let the commit points pass the transaction markers after the last records, and
        have commit points that moved with no record of ours (past markers, or past
        events skipped as done) committed at most every MARKER_COMMIT_EVERY_S (a busy
        relay's own transactions carry them sooner)."""
        for tp in self._consumer.assignment():
            if epoch != self._rebalances:
                return
            if tp in self._stopped:
                continue
            try:
                position = await self._consumer.position(tp)
            except KafkaError:
                continue  # revoked meanwhile, or not yet positioned
            self._commit_point_moved |= self._book.read_to(tp.topic, tp.partition, position)
        now = self._clock()
        if self._commit_point_moved and now - self._markers_committed_at >= MARKER_COMMIT_EVERY_S:
            self._commit_point_moved = False
            self._markers_committed_at = now
            await self._committer.submit(Flush())

    def _poll_timeout_ms(self) -> int:
        deadline = self._admission.next_deadline()
        if deadline is None:
            return POLL_MS
        # Rounded up: a batch due in under a millisecond must not make a poll that waits
        # for nothing, round after round, until it is due (a busy loop).
        until_due_ms = math.ceil((deadline - self._clock()) * 1000)
        # A due batch waits (and fills) while the uploaders are busy: look again soon.
        if until_due_ms <= 0 and not self._uploaders.idle:
            return LINGER_RECHECK_MS
        return max(0, min(POLL_MS, until_due_ms))

    async def _read_inbox(self, stop: asyncio.Event) -> None:
        released = False
        readmit: list[PendingEvent] = []
        for message in self._inbox.take_all():
            if isinstance(message, TaskRecorded):
                self._ledger_tasks.started(message.task_id, message.batch_id)
                self._admission.claim_task(message.batch_id, message.constraints, message.scm_data)
            elif isinstance(message, TaskEnded):
                batch_id = self._ledger_tasks.ended(message.task_id)
                released |= batch_id is not None and self._claim_may_end(batch_id)
            elif isinstance(message, BatchRejected):
                self._admission.release(message.batch_id)
                released = True
            elif isinstance(message, BatchAbandoned):
                readmit.extend(self._abandoned(message))
                released = True
            elif isinstance(message, LedgerCaughtUp):
                self._ledger_read = True
            elif isinstance(message, IntentOpened):
                record = message.record
                if self._book.is_in_flight(record.batch_id):
                    # This process's own, or a renewal by the partitions' new owner that
                    # resolved it: remembered in case the batch is given up here.
                    self._book.intent_seen(record)
                elif self._intents.opened(record):  # (not closed already)
                    self._admission.claim_task(record.batch_id, record.constraints, record.scm_data)
            elif isinstance(message, IntentClosed):
                closed = self._intents.closed(
                    message.batch_id,
                    recorded=bool(message.task_ids),
                    own=self._carried_in_flight(message.batch_id),
                )
                if self._book.sources_done(closed.done):
                    # Their offsets go with the next transaction, asked for now.
                    await self._committer.submit(Flush())
                readmit.extend(closed.readmit)
                for behind, moved in closed.moved:
                    self._admission.claim_held(behind, moved)
                # A recorded intent's claim passes to its tasks (see LedgerTasks).
                for task_id in message.task_ids:
                    self._ledger_tasks.started(task_id, message.batch_id, named_by_closure=True)
                released |= self._claim_may_end(message.batch_id)
        for held in readmit:
            unsent = self._still_unsent(held)
            if unsent is not None:
                await self._admit(unsent, stop)
        if released:
            while (pending := self._admission.next_released()) is not None:
                # Looked at again: values of it may have been recorded, or sent by another
                # read of the same event, while it waited.
                unsent = self._still_unsent(pending)
                if unsent is not None:
                    await self._admit(unsent, stop, released=True)
        if len(self._intents):
            await self._resolve_due(stop)

    def _abandoned(self, message: BatchAbandoned) -> list[PendingEvent]:
        """The uploaders gave a batch up. Without an intent its events are read again by
        their partitions' owners. With one, its upload may still have created a task:
        the intent is watched as another process's and resolved by whoever owns its first
        partition. What the batch carried of events this intake will not read again
        (read since it took their partitions back, and skipped as in flight then) is
        held behind the intent while it is open; once another process closed it, the
        values it did not account for are returned, to be read in again.

        While a rebalance settles, nothing is held: every partition is read again from
        its commit point after the assignment, and the batch is no longer in flight
        then, so the read takes its events (and holds them behind the intent)."""
        batch = self._book.in_flight(message.batch_id)
        seen = self._book.intent_seen_last(message.batch_id)
        self._book.forget([message.batch_id])
        if not self._ledger_tasks.running(message.batch_id):
            # (A task its intent's closure named keeps its claim until it ends.)
            self._admission.release(message.batch_id)
        intent = message.intent
        if intent is not None and seen is not None and seen.attempt > intent.attempt:
            intent = seen  # another owner renewed it since: its window is the one that holds
        if intent is None:
            return []
        open_here = self._intents.opened(intent)  # (False: closed by another process)
        if open_here:
            self._intents.given_up(intent.batch_id)
            self._admission.claim_task(intent.batch_id, intent.constraints, intent.scm_data)
        if batch is None or self._settling:
            return []
        readmit: list[PendingEvent] = []
        for pending in self._carried_by(batch):
            source = pending.source
            if (
                not self._book.owns_partition(source.topic, source.partition)
                or self._book.is_done(source)
                # Not read again yet since the partition came back (`forget` above let
                # go of its values in flight): the read holds it behind the intent.
                or source.offset >= self._book.next_to_read(source.topic, source.partition)
            ):
                continue
            behind = self._intents.hold(pending) if open_here else None
            if behind is not None:
                self._admission.claim_held(behind, pending)
            elif not open_here:
                readmit.append(pending)
        return readmit

    @property
    def _settling(self) -> bool:
        """From the start of a revoke to the end of the next assignment's restore: which
        partitions are this intake's, and what was read of them, is not settled."""
        return self._revoking or self._book.between_assignments or self._assigning

    def _carried_in_flight(self, batch_id: str) -> list[Done] | None:
        """What a batch of this process still in flight carries, by position (None: not
        in flight here)."""
        batch = self._book.in_flight(batch_id)
        if batch is None:
            return None
        return [
            Done(
                part.event.source.topic,
                part.event.source.partition,
                part.event.source.offset,
                part.covered,
                part.event.total if part.covered is not None else None,
            )
            for part in batch.parts
        ]

    def _carried_by(self, batch: Batch) -> list[PendingEvent]:
        """The events of a batch given up, each with only the values the batch carried:
        the rest of an event cut across batches was read again as not in flight, and is
        sent (or held) on its own."""
        carried: dict[int, tuple[PendingEvent, set[int] | None]] = {}
        for part in batch.parts:
            pending, covered = part.event, part.covered
            _, indexes = carried.get(id(pending), (pending, set()))
            if covered is None or indexes is None:
                carried[id(pending)] = (pending, None)
            else:
                indexes.update(covered)
                carried[id(pending)] = (pending, indexes)
        events: list[PendingEvent] = []
        for pending, indexes in carried.values():
            if indexes is None:
                events.append(pending)
                continue
            published = pending.published or pending.event
            total = sum(len(values) for values in published.constraints.values())
            share = self._without(pending, frozenset(range(total)) - indexes)
            if share is not None:
                events.append(share)
        return events

    def _claim_may_end(self, batch_id: str) -> bool:
        """Release a batch's claim once none of its tasks runs and its intent (if it has one
        another process wrote) is closed; True if released."""
        if self._intents.is_open(batch_id) or self._ledger_tasks.running(batch_id):
            return False
        self._admission.release(batch_id)
        return True

    async def _resolve_due(self, stop: asyncio.Event) -> None:
        """Hand the uploaders the intents whose writer is gone and which this intake owns."""
        owned = {(tp.topic, tp.partition) for tp in self._consumer.assignment()}
        for batch, record, sources in self._intents.due(utcnow(), owned, self._book.is_done):
            log.warning(
                "intent_orphaned",
                batch_id=record.batch_id,
                reference=record.api_reference,
                send_by=record.send_by.isoformat(),
                hint="its writer did not close it: looked up by reference, adopted or resent",
            )
            await self._send(Resolution(batch, record, sources), stop)

    async def _ask_ledger_end_again(self) -> None:
        """Ask where the ledger ends, once a second, until it answers: until the view has
        read to there, a progress record newer than the one read so far (or than the one
        a stale offset fetch names) may be on its way, and applying an older one would
        send its done events again."""
        if self._clock() - self._ledger_end_asked_at < LEDGER_END_RETRY_S:
            return
        self._ledger_end_asked_at = self._clock()
        target = await self._ledger_end(timeout_s=LEDGER_END_RETRY_S)
        if target is not None and self._ledger_end_unknown:
            self._ledger_target = target
            self._ledger_end_unknown = False
            log.info("ledger_end_known", ends=target)

    def _progress_not_read_yet(self) -> bool:
        """Whether a partition's commit names a progress record (by digest) that the
        ledger view has not read yet: it has none, or only one older than the commit
        point. Committed, the named record is in the ledger until a newer one replaces it
        (the ledger is compacted, never deleted): waiting for it is bounded by the view's
        reading, even when where the ledger ends could not be asked at the assignment."""
        if self._ledger is None:
            return False
        for tp in self._awaiting_progress:
            committed = self._book.committed(tp.topic, tp.partition)
            if committed is None or not committed[1].startswith(METADATA_PREFIX):
                continue
            raw = self._ledger.progress(tp.topic, tp.partition)
            if raw is None:
                return True
            if committed[1] == METADATA_PREFIX + progress_digest(raw):
                continue
            try:
                if decode_progress(raw).commit < committed[0]:
                    return True  # an older one: the named one is further in the ledger
            except ValueError:
                continue  # unreadable: said when applied
        return False

    def _apply_progress(self) -> None:
        """The ledger is read to where it ended at the assignment: what the assigned
        partitions' progress records say is done above their commit points (and what
        the intents closed lately carried in them) is skipped when read."""
        partitions = self._awaiting_progress
        self._awaiting_progress = set()
        for tp in sorted(partitions):
            raw = self._ledger.progress(tp.topic, tp.partition) if self._ledger else None
            committed = self._book.committed(tp.topic, tp.partition)
            if raw is None:
                self._book.apply(tp.topic, tp.partition, None)
                continue
            try:
                progress = decode_progress(raw)
            except ValueError as exc:
                log.error("progress_record_unreadable", partition=str(tp), error=str(exc))
                self._book.apply(tp.topic, tp.partition, None)
                continue
            metadata = committed[1] if committed else ""
            if metadata.startswith(METADATA_PREFIX) and metadata != (
                METADATA_PREFIX + progress_digest(raw)
            ):
                # Done never becomes undone: an older record's offsets are done too.
                log.warning(
                    "progress_record_not_the_committed_one",
                    partition=str(tp),
                    record_commit=progress.commit,
                    committed=committed[0] if committed else None,
                )
            self._book.apply(tp.topic, tp.partition, progress)
        keys = {(tp.topic, tp.partition) for tp in partitions}
        self._book.sources_done(self._intents.closed_in(keys))

    def _update_pause(self) -> None:
        reason = self._pause_reason()
        if reason and not self._paused:
            log.info("intake_paused", reason=reason)
        elif not reason and self._paused:
            log.info("intake_resumed")
        self._paused = reason is not None
        assignment = self._consumer.assignment()
        if self._paused:
            self._consumer.pause(*assignment)
            return
        self._stopped.due()  # their retry time came: read again from where they stopped
        paused = set(self._stopped.paused()) if self._stopped else set()
        limit = self._config.batching.max_read_ahead
        for tp in assignment:
            if self._book.read_ahead(tp.topic, tp.partition) >= limit:
                needed = self._intents.needed_up_to(tp.topic, tp.partition)
                if needed is not None and self._book.next_to_read(tp.topic, tp.partition) <= needed:
                    continue  # an open intent's events lie further: read on to them
                # Read far enough beyond its commit point: the partition waits for it.
                paused.add(tp)
        if not paused:
            self._consumer.resume(*assignment)
            return
        self._consumer.resume(*(tp for tp in assignment if tp not in paused))
        self._consumer.pause(*(tp for tp in assignment if tp in paused))

    def _pause_reason(self) -> str | None:
        if not self._ledger_read:
            return "reading the ledger"
        if self._assigning:
            return "taking over partitions"
        if self._ledger_target is not None:
            if self._ledger is not None and not self._ledger.reached(self._ledger_target):
                return "reading the ledger to where it ended at the assignment"
            self._ledger_target = None
        if self._awaiting_progress:
            if self._ledger_end_unknown:
                return "asking where the ledger ends"
            if self._progress_not_read_yet():
                return "reading the progress records the commit points name"
            self._apply_progress()
        if self._ledger is not None and self._ledger.stopped():
            # Intents and tasks past the batch are unknown: events they hold could go twice.
            return "a ledger partition is stopped at a record batch it cannot decode"
        if not self._health.checked:
            return "checking the API"
        if self._health.auth_failed is not None:
            return "API authentication failed"
        if self._health.misconfigured is not None:
            return "API refuses the relay's requests (configuration)"
        if self._health.degraded:
            return "API unavailable"
        if self.buffered_values >= self._config.batching.max_buffered_values:
            return "buffer full"
        if len(self._ledger_tasks) >= self._config.batching.max_unfinished_tasks:
            return "too many unfinished tasks"
        return None

    def _take(self, record: FetchedRecord) -> DeadLetter | list[Batch]:
        """Judge one record and batch it: the batches it filled, or its dead letter."""
        if self._book.received(record.topic, record.partition, record.offset):
            # Recorded before a restart or takeover (its progress record): already done.
            # The commit point may pass it now, with nothing of ours to commit it soon.
            self._metrics.events_skipped.inc()
            self._commit_point_moved = True
            return []
        raw: bytes = record.value if record.value is not None else b""
        parsed = parse_event(raw, self._config.limits)
        if not isinstance(parsed, ParsedEvent):
            self._metrics.events_invalid.labels(parsed.reason.value).inc()
            log.warning(
                "event_invalid",
                topic=record.topic,
                partition=record.partition,
                offset=record.offset,
                reason=parsed.reason.value,
                field=parsed.field,
                message=parsed.message,
            )
            return dead_letter(record, raw, parsed)
        event = parsed.event
        if parsed.warnings:
            self._metrics.date_warnings.inc(len(parsed.warnings))
            log.warning(
                "event_warning",
                event_id=event.event_id,
                partition=record.partition,
                offset=record.offset,
                warnings=list(parsed.warnings),
            )
        pending = PendingEvent(
            Source(record.topic, record.partition, record.offset, event.event_id),
            event,
            raw,
            record.key,
            self._clock(),
        )
        excluded = self._book.excluded(record.topic, record.partition, record.offset)
        if excluded:
            # Some of its values are recorded already (an event cut across batches), or in
            # an upload still under way here: only the others are sent.
            unsent = self._without(pending, excluded)
            if unsent is None:
                self._metrics.events_skipped.inc()
                return []
            pending = unsent
        behind = self._intents.hold(pending) if self._intents else None
        if behind is not None:
            # In an upload another process may still send: held until its intent closes.
            self._admission.claim_held(behind, pending)
            self._metrics.events_held_back.inc()
            log.info(
                "event_held_by_intent",
                event_id=event.event_id,
                partition=record.partition,
                offset=record.offset,
            )
            return []
        return self._batch(pending)

    @staticmethod
    def _without(pending: PendingEvent, excluded: frozenset[int]) -> PendingEvent | None:
        """`pending` without the values at `excluded` (indexes among the published
        event's values); None when none is left to send."""
        published = pending.published or pending.event
        cut = unsent_part(published, excluded)
        if cut is None:
            return None
        event, indexes = cut
        total = sum(len(values) for values in published.constraints.values())
        return replace(
            pending, event=event, indexes=indexes, total=total, published=published, parts=0
        )

    def _still_unsent(self, pending: PendingEvent) -> PendingEvent | None:
        """A held event read in again: without what is recorded meanwhile, or in an upload
        under way here. An event that carries only some of its values (`indexes`) never
        grows back to the others: they are another read's, or another batch's."""
        source = pending.source
        if self._book.is_done(source):
            return None
        excluded = self._book.excluded(source.topic, source.partition, source.offset)
        if pending.indexes is not None:
            excluded = (excluded or frozenset()) | (
                frozenset(range(pending.total)) - frozenset(pending.indexes)
            )
        return self._without(pending, excluded) if excluded else pending

    async def _admit(
        self, pending: PendingEvent, stop: asyncio.Event, *, released: bool = False
    ) -> None:
        for batch in self._batch(pending, released=released):
            await self._send(batch, stop)

    def _batch(self, pending: PendingEvent, *, released: bool = False) -> list[Batch]:
        """Offer `pending` to admission: the batches it filled (none when held back)."""
        admitted = self._admission.offer(pending, self._clock(), released=released)
        if admitted.held:
            self._metrics.events_held_back.inc()
            log.info(
                "event_held_back",
                event_id=pending.event.event_id,
                partition=pending.source.partition,
                offset=pending.source.offset,
            )
            return []
        if admitted.deduplicated:
            self._metrics.events_deduplicated.inc(admitted.deduplicated)
        return admitted.ready

    async def _send(self, job: Batch | Resolution, stop: asyncio.Event) -> None:
        """Queue a batch for the uploaders; when stopping, keep it for the shutdown flush.

        While it waits for room, intake keeps polling Kafka with its partitions paused
        (which returns nothing): a consumer that does not poll for max.poll.interval.ms
        leaves its group, and an API outage of a minute would move the partitions.
        """
        batch = job.batch if isinstance(job, Resolution) else job
        # Handed on before it waits for room: its values are in flight from now, so an
        # event cut across batches is never cut again with them (the simulation, seed
        # 1560, when it was handed on only once queued).
        self._book.handed_on(batch, intent_in_ledger=isinstance(job, Resolution))
        epoch = self._rebalances
        while not stop.is_set():
            # Counted from intake's last poll: many short waits in a row add up too.
            wait_s = max(0.0, self._last_poll + QUEUE_KEEPALIVE_S - self._clock())
            try:
                async with asyncio.timeout(wait_s):
                    await self._uploaders.put(job)
            except TimeoutError:
                pass
            else:
                return
            self._hold("uploads queued behind a busy API")
            try:
                await self._consumer.getmany(timeout_ms=0)  # every partition paused: no records
            except UndecodableRecordsError as error:
                self._undecodable(error)
            self._last_poll = self._clock()
            if epoch != self._rebalances:
                # Revoked while this batch waited: like every unsent batch, it is forgotten
                # and its events are read again by the partitions' next owner (this one
                # too: `forget` lets go of offsets held in flight for it); an intent it
                # was to resolve is resolved by whoever owns them next.
                self._book.forget([batch.batch_id])
                if isinstance(job, Resolution):
                    self._intents.given_up(batch.batch_id)
                    self._reclaim_intents()
                else:
                    self._admission.release(batch.batch_id)
                return
        if isinstance(job, Resolution):
            self._book.forget([batch.batch_id])  # the next start resolves it
        else:
            self._unsent.append(batch)

    def _hold(self, reason: str) -> None:
        """Pause the input partitions until the next round decides again."""
        if not self._paused:
            log.info("intake_paused", reason=reason)
            self._paused = True
        self._consumer.pause(*self._consumer.assignment())

    # -- rebalances (called by aiokafka's coordinator, between intake's polls) -----------

    async def partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        """Forget unsent work, wait (bounded) for uploads under way and for the committer
        to commit what they accounted for.

        aiokafka rebalances eagerly: every partition is revoked, and those assigned again
        are re-read from their committed offsets. Events not sent are simply read again;
        events in an upload still under way at the deadline are skipped when read again
        here (their upload accounts for them), and re-sent only by another owner.
        """
        if not revoked:
            return
        self._revoking = True
        try:
            await self._revoke(revoked)
        finally:
            self._revoking = False

    async def _revoke(self, revoked: set[TopicPartition]) -> None:
        self._rebalances += 1
        self._awaiting_progress = set()
        self._ledger_end_unknown = False
        batch_ids, dropped = self._admission.drop_unsent(self._uploaders.take_queued())
        self._book.forget(batch_ids)
        dropped += self._intents.forget_held(under_way=self._book.under_way_or_closed_here)
        self._reclaim_intents()
        try:
            async with asyncio.timeout(self._config.batching.rebalance_timeout_s):
                await self._book.settled()
                # Accounted is not committed: offsets of partitions that move away would
                # be lost with their trackers. Then no transaction until the assignment.
                await self._committer.flush_and_hold()
        except TimeoutError:
            self._committer.hold()
        for batch_id in self._book.keep_in_flight():
            self._admission.release(batch_id)
        # Nothing is this intake's until the group assigns partitions again: uploads
        # still under way learn before their next step whether they still are.
        self._book.revoked()
        late = self._book.in_flight_batches
        if late:
            # Their intents are in the ledger: the next owner holds their events until
            # they close (docs/design.md section 11).
            log.warning("rebalance_deadline_uploads_in_flight", batches=late)
        log.info(
            "partitions_revoked",
            partitions=sorted(f"{tp.topic}:{tp.partition}" for tp in revoked),
            dropped_events=dropped,
        )

    async def _restore(self, assigned: set[TopicPartition]) -> None:
        committed = await self._group_offsets.list_consumer_group_offsets(
            self._config.kafka.group_id, partitions=sorted(assigned)
        )
        for tp in assigned:
            point = committed.get(tp)
            if point is not None and point.offset >= 0:
                self._book.restore(tp.topic, tp.partition, point.offset, point.metadata)
                self._consumer.seek(tp, point.offset)
                self._next_offset[tp] = point.offset
            else:
                # Never committed: where reading starts is the commit point, so that every
                # transaction can carry a (fencing) offset commit from now on.
                await self._consumer.seek_to_beginning(tp)
                start = await self._consumer.position(tp)
                self._book.restore(tp.topic, tp.partition, start, None)
                self._next_offset[tp] = start

    async def _ledger_end(self, timeout_s: float | None = None) -> dict[int, int] | None:
        """Where every ledger partition ends now (None: unknown, asked again later)."""
        if self._ledger is None:
            return None
        try:
            async with asyncio.timeout(timeout_s or self._config.batching.rebalance_timeout_s):
                return await self._ledger.end_offsets()
        except (TimeoutError, KafkaError) as exc:
            log.warning("ledger_end_unknown_at_assignment", error=type(exc).__name__)
            return None

    def _reclaim_intents(self) -> None:
        """Open intents claim their codes again (dropping unsent work released them)."""
        for record in self._intents.claims():
            self._admission.claim_task(record.batch_id, record.constraints, record.scm_data)

    async def partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        """New partitions start from their committed offsets; the offsets done above
        them, from the commit metadata, are skipped.

        While this runs (it awaits), intake's loop goes on: the partitions are paused and
        anything fetched before is not processed (the epoch moves), and each is sought
        back to its start at the end. Then intake stays paused until the ledger view has
        read every ledger partition to where it ended now, open transactions included:
        an intent the previous owner committed just before it lost the partitions is
        known before their events are read."""
        self._rebalances += 1
        self._assigning = True
        self._consumer.pause(*assigned)
        try:
            self._committer.resume()
            self._book.keep_only({(tp.topic, tp.partition) for tp in assigned})
            self._book.assigned({(tp.topic, tp.partition) for tp in assigned}, self._generation())
            self._stopped.keep_only(assigned)
            self._next_offset = {}
            self._metrics.consumer_lag.clear()
            if assigned:
                await self._restore(assigned)
                self._awaiting_progress = set(assigned)
                self._ledger_target = await self._ledger_end()
                self._ledger_end_unknown = self._ledger_target is None and self._ledger is not None
        finally:
            self._assigning = False
        log.info(
            "partitions_assigned",
            partitions=sorted(f"{tp.topic}:{tp.partition}" for tp in assigned),
        )

    async def refresh_gauges(self) -> None:
        """Pause state, buffered values and the lag of every assigned partition."""
        self._metrics.intake_paused.set(1 if self._paused else 0)
        self._metrics.buffered_values.set(self.buffered_values)
        for tp in self._consumer.assignment():
            highwater = self._consumer.highwater(tp)
            if highwater is None:
                continue
            try:
                position = await self._consumer.position(tp)
            except KafkaError:
                continue
            self._metrics.consumer_lag.labels(str(tp.partition)).set(max(0, highwater - position))


def dead_letter(record: FetchedRecord, raw: bytes, refused: Rejection) -> DeadLetter:
    """The dead letter of an input record the contract refused: its bytes, unchanged."""
    headers = DeadLetterHeaders(
        stage=refused.stage,
        reason=refused.reason,
        message=refused.message,
        source_topic=record.topic,
        source_partition=record.partition,
        source_offset=record.offset,
        field=refused.field,
    )
    return DeadLetter(
        Source(record.topic, record.partition, record.offset), raw, record.key, headers
    )


class _InputRebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, intake: Intake) -> None:
        self._intake = intake

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self._intake.partitions_revoked(set(revoked))

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        await self._intake.partitions_assigned(set(assigned))
