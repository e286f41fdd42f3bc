"""Intake's offset book: which input records were read, which left intake in a batch
not yet recorded, and which are accounted for (so their offsets may be committed).

Intake owns it. The committer is the one other caller, through the `Accounting`
protocol, and only inside its transaction: a batch is accounted for in the same
transaction that records it, so the offsets it releases travel with its ledger
record. Both run on the one event loop and these calls never await, so no
caller sees the book half-changed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from service.core.batching import Batch, Source
from service.core.offsets import OffsetTracker


class OffsetBook:
    """Offsets per input partition, and the batches handed on but not yet recorded."""

    def __init__(self) -> None:
        self._offsets = OffsetTracker()
        self._in_flight: dict[str, Batch] = {}
        self._intent_written: set[str] = set()  # in-flight batches with an intent in the ledger
        self._settled = asyncio.Event()
        self._settled.set()

    # -- intake ------------------------------------------------------------------------

    def received(self, topic: str, partition: int, offset: int) -> bool:
        """A record was read; True when it is already done (skip it)."""
        return self._offsets.received(topic, partition, offset)

    def restore(self, topic: str, partition: int, offset: int, metadata: str | None) -> None:
        """Start an assigned partition over from the group's commit point and its done
        offsets. What this process knew of it before is dropped: another member may have
        owned it meanwhile (this one was paused past its session) and committed past
        offsets still pending here, which would have held the commit point for ever.
        Events of this process's batches still in flight are skipped when read again and
        hold the commit point until their upload is accounted for."""
        tracker = self._offsets.reset(topic, partition)
        tracker.restore(offset, metadata)
        for batch in self._in_flight.values():
            for part in batch.parts:
                source = part.event.source
                if (source.topic, source.partition) == (topic, partition):
                    tracker.hold_in_flight(source.offset)

    def read_to(self, topic: str, partition: int, position: int) -> bool:
        """The consumer's position past transaction markers (see PartitionOffsets.read_to);
        True when the partition's commit point moved."""
        return self._offsets.read_to(topic, partition, position)

    def is_done(self, source: Source) -> bool:
        """Whether the event at `source` is accounted for (or to be skipped)."""
        return self._offsets.is_done(source.topic, source.partition, source.offset)

    def keep_only(self, partitions: set[tuple[str, int]]) -> None:
        """Forget every partition but these."""
        self._offsets.keep_only(partitions)

    def is_in_flight(self, batch_id: str) -> bool:
        """Whether `batch_id` is a batch of this process between intake and the ledger."""
        return batch_id in self._in_flight

    def handed_on(self, batch: Batch) -> None:
        """`batch` left intake for the uploaders."""
        self._in_flight[batch.batch_id] = batch
        self._settled.clear()

    def forget(self, batch_ids: Iterable[str]) -> None:
        """These batches were never sent (dropped at a rebalance): their events are read
        again, so nothing of them will be accounted for here."""
        for batch_id in batch_ids:
            self._in_flight.pop(batch_id, None)
            self._intent_written.discard(batch_id)
        self._note_settled()

    def keep_in_flight(self) -> list[str]:
        """At a rebalance deadline: batches whose intent is in the ledger may be sent, so
        they stay (`restore` makes their offsets skipped when read again here; they are
        accounted for when their upload ends; another owner holds them behind the
        intent). Every other batch is forgotten: its intent can no longer be written
        (`claim_intent`), and its events are read again. Returns the forgotten ids."""
        forgotten = [b for b in self._in_flight if b not in self._intent_written]
        self.forget(forgotten)
        return forgotten

    @property
    def in_flight_batches(self) -> int:
        """Batches between intake and the ledger."""
        return len(self._in_flight)

    async def settled(self) -> None:
        """Wait until no batch is between intake and the ledger."""
        await self._settled.wait()

    @property
    def in_flight_values(self) -> int:
        """Constraint values in batches queued or being uploaded."""
        return sum(batch.size for batch in self._in_flight.values())

    # -- the committer (Accounting) -----------------------------------------------------

    def dead_lettered(self, topic: str, partition: int, offset: int) -> None:
        """The record is in the dead-letter topic."""
        self._offsets.accounted(topic, partition, offset)

    def claim_intent(self, batch_id: str) -> bool:
        """The committer is about to write `batch_id`'s intent: allowed only while the batch
        is this intake's (a rebalance forgets batches without an intent, whose events the
        partitions' next owner reads again)."""
        if batch_id not in self._in_flight:
            return False
        self._intent_written.add(batch_id)
        return True

    def batch_recorded(self, batch: Batch) -> None:
        """`batch` is recorded (or dead-lettered): its events' parts are accounted for."""
        self._in_flight.pop(batch.batch_id, None)
        self._intent_written.discard(batch.batch_id)
        for part in batch.parts:
            pending = part.event
            pending.parts_done += 1
            if pending.parts_done == pending.parts:
                source = pending.source
                self._offsets.accounted(source.topic, source.partition, source.offset)
        self._note_settled()

    def sources_done(self, sources: Iterable[Source]) -> int:
        """Events recorded by position (an intent resolved here, or by another replica):
        accounted for where this intake tracks their partition. Returns how many were."""
        return sum(1 for s in sources if self._offsets.done(s.topic, s.partition, s.offset))

    def checkpoints(self) -> dict[tuple[str, int], tuple[int, str]]:
        """Partitions whose commit point moved, with (offset, metadata)."""
        return self._offsets.checkpoints()

    def fence_points(self) -> dict[tuple[str, int], tuple[int, str]]:
        """The last commit point of every partition tracked."""
        return self._offsets.commit_points()

    def _note_settled(self) -> None:
        if not self._in_flight:
            self._settled.set()
