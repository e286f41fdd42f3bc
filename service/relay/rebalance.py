"""Intake's side of the input group's rebalances (called by aiokafka's coordinator,
between intake's polls): what a revoke drops and waits for, and where an assignment
starts reading (docs/design.md section 11, "Rebalances").
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import structlog
from aiokafka import ConsumerRebalanceListener, TopicPartition

from service.metrics import RelayMetrics
from service.relay.admission import Admission
from service.relay.book import OffsetBook
from service.relay.catch_up import LedgerCatchUp
from service.relay.claims import Claims
from service.relay.intake_peers import CommitQueue, UploadQueue
from service.relay.ports import GroupOffsets, InputConsumer
from service.relay.reader import InputReader

log = structlog.get_logger(__name__)


class InputRebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    """The listener the input consumer is subscribed with."""

    def __init__(
        self,
        *,
        group_id: str,
        timeout_s: float,
        consumer: InputConsumer,
        group_offsets: GroupOffsets,
        reader: InputReader,
        book: OffsetBook,
        admission: Admission,
        claims: Claims,
        catch_up: LedgerCatchUp,
        uploaders: UploadQueue,
        committer: CommitQueue,
        metrics: RelayMetrics,
        generation: Callable[[], int | None],
    ) -> None:
        self._group_id = group_id
        self._timeout_s = timeout_s
        self._consumer = consumer
        self._group_offsets = group_offsets
        self._reader = reader
        self._book = book
        self._admission = admission
        self._claims = claims
        self._catch_up = catch_up
        self._uploaders = uploaders
        self._committer = committer
        self._metrics = metrics
        self._generation = generation
        self._assigning = False
        self._revoking = False

    @property
    def assigning(self) -> bool:
        """Partitions are being assigned (restored to their commit points)."""
        return self._assigning

    @property
    def settling(self) -> bool:
        """From the start of a revoke to the end of the next assignment's restore: which
        partitions are this intake's, and what was read of them, is not settled."""
        return self._revoking or self._book.between_assignments or self._assigning

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self.partitions_revoked(set(revoked))

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        await self.partitions_assigned(set(assigned))

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
        self._reader.rebalanced()
        self._catch_up.revoked()
        batch_ids, dropped = self._admission.drop_unsent(self._uploaders.take_queued())
        self._book.forget(batch_ids)
        dropped += self._claims.forget_deferred()
        self._claims.reclaim_intents()
        try:
            async with asyncio.timeout(self._timeout_s):
                await self._book.settled()
                # Accounted is not committed: offsets of partitions that move away would
                # be lost with their trackers. Then no transaction until the assignment.
                await self._committer.flush_and_suspend()
        except TimeoutError:
            self._committer.suspend()
        for batch_id in self._book.keep_in_flight():
            self._admission.release(batch_id)
        # Nothing is this intake's until the group assigns partitions again: uploads
        # still under way learn before their next step whether they still are.
        self._book.revoked()
        late = self._book.in_flight_batches
        if late:
            # Their intents are in the ledger: the next owner defers their events until
            # they close (docs/design.md section 11).
            log.warning("rebalance_deadline_uploads_in_flight", batches=late)
        log.info(
            "partitions_revoked",
            partitions=sorted(f"{tp.topic}:{tp.partition}" for tp in revoked),
            dropped_events=dropped,
        )

    async def partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        """New partitions start from their committed offsets; the offsets done above
        them, from the commit metadata, are skipped.

        While this runs (it awaits), intake's loop goes on: the partitions are paused and
        anything fetched before is not processed (the epoch moves), and each is sought
        back to its start at the end. Then intake stays paused until the ledger view has
        read every ledger partition to where it ended now, open transactions included:
        an intent the previous owner committed just before it lost the partitions is
        known before their events are read."""
        self._reader.rebalanced()
        self._assigning = True
        self._consumer.pause(*assigned)
        try:
            self._committer.resume()
            self._book.keep_only({(tp.topic, tp.partition) for tp in assigned})
            self._book.assigned({(tp.topic, tp.partition) for tp in assigned}, self._generation())
            self._reader.keep_only(assigned)
            self._metrics.consumer_lag.clear()
            if assigned:
                await self._restore(assigned)
                await self._catch_up.assigned(assigned)
        finally:
            self._assigning = False
        log.info(
            "partitions_assigned",
            partitions=sorted(f"{tp.topic}:{tp.partition}" for tp in assigned),
        )

    async def _restore(self, assigned: set[TopicPartition]) -> None:
        committed = await self._group_offsets.list_consumer_group_offsets(
            self._group_id, partitions=sorted(assigned)
        )
        for tp in assigned:
            point = committed.get(tp)
            if point is not None and point.offset >= 0:
                self._book.restore(tp.topic, tp.partition, point.offset, point.metadata)
                self._consumer.seek(tp, point.offset)
                self._reader.read_from(tp, point.offset)
            else:
                # Never committed: where reading starts is the commit point, so that every
                # transaction can carry a (fencing) offset commit from now on.
                await self._consumer.seek_to_beginning(tp)
                start = await self._consumer.position(tp)
                self._book.restore(tp.topic, tp.partition, start, None)
                self._reader.read_from(tp, start)
