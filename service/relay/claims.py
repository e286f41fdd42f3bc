"""Intake's claim bookkeeping: which codes wait for what. The ledger view tells intake
of tasks recorded and ended and of other processes' intents opened and closed; the
uploaders of batches rejected or given up. Each claims codes in the order guard
(`Admission`) or lets a claim end; events deferred behind an intent are deferred
further, read in again or done when it closes; intents whose writer is gone are handed on to be
resolved (docs/design.md section 11, "Who may send what an intent covers").
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Collection
from dataclasses import replace

import structlog

from service.core.batching import Batch, Done, PendingEvent, unsent_part
from service.relay.admission import Admission
from service.relay.book import OffsetBook
from service.relay.config import utcnow
from service.relay.intake_peers import CommitQueue
from service.relay.intents import IntentWatch, LedgerTasks
from service.relay.messages import (
    BatchAbandoned,
    BatchRejected,
    Flush,
    IntakeMessage,
    IntentClosed,
    IntentOpened,
    LedgerCaughtUp,
    Resolution,
    TaskEnded,
    TaskRecorded,
)
from service.relay.ports import InputConsumer

log = structlog.get_logger(__name__)


class Claims:
    """The tasks and open intents that claim codes, and the events deferred behind them."""

    def __init__(
        self,
        *,
        admission: Admission,
        book: OffsetBook,
        committer: CommitQueue,
        consumer: InputConsumer,
        settling: Callable[[], bool],
        admit: Callable[[PendingEvent, asyncio.Event, bool], Awaitable[None]],
        send: Callable[[Batch | Resolution, asyncio.Event], Awaitable[None]],
    ) -> None:
        self._admission = admission
        self._book = book
        self._committer = committer
        self._consumer = consumer
        self._settling = settling
        self._admit = admit
        self._send = send
        self._intents = IntentWatch()
        self._ledger_tasks = LedgerTasks()
        self._ledger_read = False

    @property
    def ledger_read(self) -> bool:
        """Whether the ledger view has read the whole ledger once (every claim known)."""
        return self._ledger_read

    @property
    def unfinished_tasks(self) -> int:
        """Tasks in the ledger not yet ended."""
        return len(self._ledger_tasks)

    def needed_up_to(self, topic: str, partition: int) -> int | None:
        """The furthest offset of the partition an open intent covers (its resolver needs
        every one of its events deferred)."""
        return self._intents.needed_up_to(topic, partition)

    def closed_in(self, partitions: Collection[tuple[str, int]]) -> list[Done]:
        """What the intents closed lately carried in these partitions (just assigned)."""
        return self._intents.closed_in(partitions)

    async def read(self, messages: list[IntakeMessage], stop: asyncio.Event) -> None:
        """Take in what the inbox brought; admit what it frees."""
        released = False
        readmit: list[PendingEvent] = []
        for message in messages:
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
                    self._admission.claim_deferred(behind, moved)
                # A recorded intent's claim passes to its tasks (see LedgerTasks).
                for task_id in message.task_ids:
                    self._ledger_tasks.started(task_id, message.batch_id, named_by_closure=True)
                released |= self._claim_may_end(message.batch_id)
        for deferred in readmit:
            unsent = self.still_unsent(deferred)
            if unsent is not None:
                await self._admit(unsent, stop, False)
        if released:
            while (pending := self._admission.next_released()) is not None:
                # Looked at again: values of it may have been recorded, or sent by another
                # read of the same event, while it waited.
                unsent = self.still_unsent(pending)
                if unsent is not None:
                    await self._admit(unsent, stop, True)
        if len(self._intents):
            await self._resolve_due(stop)

    def _abandoned(self, message: BatchAbandoned) -> list[PendingEvent]:
        """The uploaders gave a batch up. Without an intent its events are read again by
        their partitions' owners. With one, its upload may still have created a task:
        the intent is watched as another process's and resolved by whoever owns its first
        partition. What the batch carried of events this intake will not read again
        (read since it took their partitions back, and skipped as in flight then) is
        deferred behind the intent while it is open; once another process closed it, the
        values it did not account for are returned, to be read in again.

        While a rebalance settles, nothing is deferred: every partition is read again from
        its commit point after the assignment, and the batch is no longer in flight
        then, so the read takes its events (and defers them behind the intent)."""
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
        if batch is None or self._settling():
            return []
        readmit: list[PendingEvent] = []
        for pending in _carried_by(batch):
            source = pending.source
            if (
                not self._book.owns_partition(source.topic, source.partition)
                or self._book.is_done(source)
                # Not read again yet since the partition came back (`forget` above let
                # go of its values in flight): the read defers it behind the intent.
                or source.offset >= self._book.next_to_read(source.topic, source.partition)
            ):
                continue
            behind = self._intents.defer(pending) if open_here else None
            if behind is not None:
                self._admission.claim_deferred(behind, pending)
            elif not open_here:
                readmit.append(pending)
        return readmit

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

    def defer(self, pending: PendingEvent) -> bool:
        """Defer an event just read until the open intent that covers it closes, if one
        does (in an upload another process may still send); True if deferred."""
        behind = self._intents.defer(pending) if self._intents else None
        if behind is None:
            return False
        self._admission.claim_deferred(behind, pending)
        return True

    def still_unsent(self, pending: PendingEvent) -> PendingEvent | None:
        """A deferred event read in again: without what is recorded meanwhile, or in an upload
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
        return without(pending, excluded) if excluded else pending

    def forget_deferred(self) -> int:
        """A revoke: events deferred behind intents are let go (read again after the
        assignment), but for intents of uploads under way or closed here. Returns how
        many."""
        return self._intents.forget_deferred(under_way=self._book.under_way_or_closed_here)

    def reclaim_intents(self) -> None:
        """Open intents claim their codes again (dropping unsent work released them)."""
        for record in self._intents.claims():
            self._admission.claim_task(record.batch_id, record.constraints, record.scm_data)

    def revoked_while_queued(self, job: Batch | Resolution) -> None:
        """Revoked while `job` waited for room in the uploaders' queue: like every unsent
        batch, it is forgotten and its events are read again by the partitions' next
        owner (this one too: `forget` lets go of offsets held in flight for it); an
        intent it was to resolve is resolved by whoever owns them next."""
        batch = job.batch if isinstance(job, Resolution) else job
        self._book.forget([batch.batch_id])
        if isinstance(job, Resolution):
            self._intents.given_up(batch.batch_id)
            self.reclaim_intents()
        else:
            self._admission.release(batch.batch_id)


def without(pending: PendingEvent, excluded: frozenset[int]) -> PendingEvent | None:
    """`pending` without the values at `excluded` (indexes among the published event's
    values); None when none is left to send."""
    published = pending.published or pending.event
    cut = unsent_part(published, excluded)
    if cut is None:
        return None
    event, indexes = cut
    total = sum(len(values) for values in published.constraints.values())
    return replace(pending, event=event, indexes=indexes, total=total, published=published, parts=0)


def _carried_by(batch: Batch) -> list[PendingEvent]:
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
        share = without(pending, frozenset(range(total)) - indexes)
        if share is not None:
            events.append(share)
    return events
