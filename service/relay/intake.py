"""Intake: reads the input topic, validates each record, admits events into batches
(or holds them back behind an unfinished change to their codes) and hands full or
due batches to the uploaders.

It owns the input consumer, the offset book, the batcher and the order guard, the
pause state and the input partitions' rebalances. Others reach it only through
its inbox, read at every poll: the ledger view reports tasks recorded and
ended, the uploaders report rejected batches.

Its parts, each a module of its own: the reading of the input partitions
(`reader.py`), the claim bookkeeping (`claims.py`), the rebalances (`rebalance.py`)
and, after an assignment, the wait for the ledger and the progress records
(`catch_up.py`).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from typing import Final

import structlog
from aiokafka import ConsumerRebalanceListener, TopicPartition

from service.core.batching import Batch, PendingEvent
from service.kafka import UndecodableRecordsError
from service.metrics import RelayMetrics
from service.relay.admission import Admission
from service.relay.book import OffsetBook
from service.relay.catch_up import LedgerCatchUp
from service.relay.claims import Claims, without
from service.relay.config import RelayConfig
from service.relay.health import ApiHealth
from service.relay.intake_peers import CommitQueue, LedgerSync, UploadQueue
from service.relay.judging import judge
from service.relay.messages import DeadLetter, IntakeMessage, Mailbox, Resolution
from service.relay.ports import FetchedRecord, GroupOffsets, InputConsumer
from service.relay.reader import MAX_RECORDS, InputReader
from service.relay.rebalance import InputRebalance

log = structlog.get_logger(__name__)

POLL_MS: Final = 100
# A full poll is tens of milliseconds of judging and batching: intake lets the other
# stages run every this many records, so an upload's slot (used only within 10 ms of
# its start, service/core/slots.py) and the committer are not kept waiting behind it.
YIELD_EVERY_RECORDS: Final = 64
# How often intake looks again at a due batch that waits for a free uploader.
LINGER_RECHECK_MS: Final = 20
# While the upload queue is full, intake polls Kafka (partitions paused) this often, well
# inside max.poll.interval.ms.
QUEUE_KEEPALIVE_S: Final = 1.0


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
        self._admission = admission
        self._book = book
        self._uploaders = uploaders
        self._committer = committer
        self._health = health
        self._metrics = metrics
        self._clock = clock
        self._inbox = inbox
        self._unsent: list[Batch] = []  # not queued when the stop came: flushed at shutdown
        self._claims = Claims(
            admission=admission,
            book=book,
            committer=committer,
            consumer=consumer,
            settling=lambda: self._rebalance.settling,
            admit=self._admit,
            send=self._send,
        )
        self._reader = InputReader(
            consumer,
            book=book,
            committer=committer,
            metrics=metrics,
            clock=clock,
            max_read_ahead=config.batching.max_read_ahead,
            timeout_ms=self._poll_timeout_ms,
            needed_up_to=self._claims.needed_up_to,
            handle=self._handle,
        )
        self._catch_up = LedgerCatchUp(
            ledger,
            book=book,
            closed_in=self._claims.closed_in,
            clock=clock,
            timeout_s=config.batching.rebalance_timeout_s,
        )
        self._rebalance = InputRebalance(
            group_id=config.kafka.group_id,
            timeout_s=config.batching.rebalance_timeout_s,
            consumer=consumer,
            group_offsets=group_offsets,
            reader=self._reader,
            book=book,
            admission=admission,
            claims=self._claims,
            catch_up=self._catch_up,
            uploaders=uploaders,
            committer=committer,
            metrics=metrics,
            generation=generation,
        )

    def rebalance_listener(self) -> ConsumerRebalanceListener:
        """The listener to subscribe the input consumer with."""
        return self._rebalance

    @property
    def paused(self) -> bool:
        """Whether the input partitions are paused."""
        return self._reader.paused

    def stopped_reasons(self) -> list[str]:
        """Input partitions stopped at a record batch that cannot be decoded (readiness)."""
        return self._reader.stopped_reasons()

    @property
    def buffered_values(self) -> int:
        """Values read but not yet in a recorded task: open batches, held events, and
        batches queued or being uploaded."""
        return self._admission.buffered_values + self._book.in_flight_values

    async def run(self, stop: asyncio.Event) -> list[Batch]:
        """Consume until `stop` is set; returns the batches left to flush at shutdown."""
        reader = self._reader
        while not stop.is_set():
            await self._claims.read(self._inbox.take_all(), stop)
            if self._catch_up.ledger_end_unknown:
                await self._catch_up.ask_ledger_end_again()
            reader.update_pause(self._pause_reason())
            # Before the poll: records a poll returns across a rebalance are read again
            # from where the new assignment starts, never taken into the new epoch.
            epoch = reader.epoch
            try:
                batches = await reader.poll(stop)
            except UndecodableRecordsError as error:
                reader.polled()
                reader.undecodable(error)
                continue
            reader.polled()
            if epoch != reader.epoch:
                reader.unread(batches)
                continue
            consumed = 0
            every_record_taken = True
            for record in (r for records in batches.values() for r in records):
                if consumed and consumed % YIELD_EVERY_RECORDS == 0:
                    await asyncio.sleep(0)
                if stop.is_set() or epoch != reader.epoch:
                    # Records not processed are not tracked: read again from the commit.
                    every_record_taken = False
                    break
                consumed += 1
                await self._handle(record, stop)
            self._metrics.events_consumed.inc(consumed)
            if every_record_taken:
                reader.taken_to(batches)
                if consumed < MAX_RECORDS:
                    await reader.pass_markers(epoch)
            # Linger-due batches go only when an uploader is free to take them at once;
            # until then they keep filling (full ones are queued regardless).
            if self._uploaders.idle:
                for batch in self._admission.due(self._clock(), limit=1):
                    await self._send(batch, stop)
        log.info("relay_stopping", open_batches=self._admission.open_batches)
        flushed = self._admission.close_all()
        for batch in flushed:
            # Flushed at shutdown: handed on under the partitions still owned (the
            # consumer lets go of them only after the uploaders have drained).
            self._book.handed_on(batch)
        return [*self._unsent, *flushed]

    async def _handle(self, record: FetchedRecord, stop: asyncio.Event) -> None:
        # Taking a record never waits; only what it leads to may (a full batch to queue,
        # a dead letter to hand the committer).
        taken = self._take(record)
        if isinstance(taken, DeadLetter):
            taken.owner = self._book.token(taken.source.topic, taken.source.partition)
            await self._committer.submit(taken)
        else:
            for batch in taken:
                await self._send(batch, stop)

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

    def _pause_reason(self) -> str | None:
        if not self._claims.ledger_read:
            return "reading the ledger"
        if self._rebalance.assigning:
            return "taking over partitions"
        reason = self._catch_up.pause_reason()
        if reason is not None:
            return reason
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
        if self._claims.unfinished_tasks >= self._config.batching.max_unfinished_tasks:
            return "too many unfinished tasks"
        return None

    def _take(self, record: FetchedRecord) -> DeadLetter | list[Batch]:
        """Judge one record and batch it: the batches it filled, or its dead letter."""
        if self._book.received(record.topic, record.partition, record.offset):
            # Recorded before a restart or takeover (its progress record): already done.
            # The commit point may pass it now, with nothing of ours to commit it soon.
            self._metrics.events_skipped.inc()
            self._reader.skipped_done()
            return []
        judged = judge(record, self._config.limits, self._metrics, self._clock)
        if isinstance(judged, DeadLetter):
            return judged
        pending = judged
        excluded = self._book.excluded(record.topic, record.partition, record.offset)
        if excluded:
            # Some of its values are recorded already (an event cut across batches), or in
            # an upload still under way here: only the others are sent.
            unsent = without(pending, excluded)
            if unsent is None:
                self._metrics.events_skipped.inc()
                return []
            pending = unsent
        if self._claims.defer(pending):
            # In an upload another process may still send: held until its intent closes.
            self._metrics.events_held_back.inc()
            log.info(
                "event_held_by_intent",
                event_id=pending.source.event_id,
                partition=record.partition,
                offset=record.offset,
            )
            return []
        return self._batch(pending)

    async def _admit(self, pending: PendingEvent, stop: asyncio.Event, released: bool) -> None:
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
        epoch = self._reader.epoch
        while not stop.is_set():
            # Counted from intake's last poll: many short waits in a row add up too.
            wait_s = max(0.0, self._reader.last_poll + QUEUE_KEEPALIVE_S - self._clock())
            try:
                async with asyncio.timeout(wait_s):
                    await self._uploaders.put(job)
            except TimeoutError:
                pass
            else:
                return
            self._reader.pause_all("uploads queued behind a busy API")
            await self._reader.keepalive()
            if epoch != self._reader.epoch:
                self._claims.revoked_while_queued(job)
                return
        if isinstance(job, Resolution):
            self._book.forget([batch.batch_id])  # the next start resolves it
        else:
            self._unsent.append(batch)

    # -- rebalances (called by aiokafka's coordinator, between intake's polls) -----------

    async def partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        """See InputRebalance.partitions_revoked."""
        await self._rebalance.partitions_revoked(revoked)

    async def partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        """See InputRebalance.partitions_assigned."""
        await self._rebalance.partitions_assigned(assigned)

    async def refresh_gauges(self) -> None:
        """Pause state, buffered values and the lag of every assigned partition."""
        self._metrics.intake_paused.set(1 if self._reader.paused else 0)
        self._metrics.buffered_values.set(self.buffered_values)
        await self._reader.refresh_lag()
