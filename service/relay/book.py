"""Intake's offset book: which input records were read, which left intake in a batch
not yet recorded, which are accounted for (so their offsets may be committed), and
which partitions this intake owns, since when (`PartitionOwnership`,
service/relay/ownership.py).

Intake owns it. The committer is the one other caller, through the `Accounting`
protocol, and only inside its transaction: a batch is accounted for in the same
transaction that records it, so the offsets it releases (and the partition's
progress record) travel with its ledger record. The uploaders ask it whether a
batch's partitions are still this intake's before they send. All run on the one
event loop and these calls never await, so no caller sees the book half-changed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection, Iterable

from service.core.batching import Batch, Done, Part, Source
from service.core.offsets import Checkpoint, OffsetTracker, PartitionOffsets, Progress
from service.core.records import IntentRecord
from service.relay.ownership import PartitionOwnership

# Batch ids recorded here remembered until their closures are read back: far more than
# the ledger view can lag behind the committer by.
CLOSED_HERE_KEPT = 10_000


class OffsetBook:
    """Offsets per input partition, the batches handed on but not yet recorded, and the
    partitions owned."""

    def __init__(self) -> None:
        self._offsets = OffsetTracker()
        self._in_flight: dict[str, Batch] = {}
        self._intent_written: set[str] = set()  # in-flight batches with an intent in the ledger
        # Batches recorded (their intents closed) by this process lately, oldest first.
        self._closed_here: dict[str, None] = {}
        # The newest intent the ledger showed for each batch in flight (bounded by them).
        self._intents_seen: dict[str, IntentRecord] = {}
        self._settled = asyncio.Event()
        self._settled.set()
        self._ownership = PartitionOwnership()

    # -- intake ------------------------------------------------------------------------

    def received(self, topic: str, partition: int, offset: int) -> bool:
        """A record was read; True when it is already done (skip it)."""
        return self._offsets.received(topic, partition, offset)

    def excluded(self, topic: str, partition: int, offset: int) -> frozenset[int] | None:
        """The indexes of the values of the event read at this position not to send
        again (recorded, or in an upload under way), or None when none are."""
        tracker = self._offsets.tracked(topic, partition)
        return tracker.excluded(offset) if tracker is not None else None

    def restore(self, topic: str, partition: int, offset: int, metadata: str | None) -> None:
        """Start an assigned partition over from the group's commit point. What this
        process knew of it before is dropped: another member may have owned it meanwhile
        (this one was paused past its session) and committed past offsets still pending
        here, which would have held the commit point for ever. What is done above it
        comes with the partition's progress record (`apply`). Events of this process's
        batches still in flight are skipped when read again (their values in flight, for
        an event cut across batches) and hold the commit point until their upload is
        accounted for."""
        tracker = self._offsets.reset(topic, partition)
        tracker.restore(offset, metadata)
        for batch in self._in_flight.values():
            for part in batch.parts:
                source = part.event.source
                if (source.topic, source.partition) == (topic, partition):
                    self._mark_in_flight(tracker, part)

    @staticmethod
    def _mark_in_flight(tracker: PartitionOffsets, part: Part) -> None:
        offset = part.event.source.offset
        if part.covered is None:
            tracker.mark_in_flight(offset)
        else:
            tracker.values_in_flight(offset, part.event.total, part.covered)

    def apply(self, topic: str, partition: int, progress: Progress | None) -> None:
        """What the partition's progress record says is done at and above its commit
        point (None: it has none). Until then nothing is checkpointed for it."""
        tracker = self._offsets.tracked(topic, partition)
        if tracker is not None:
            tracker.apply(progress)

    def committed(self, topic: str, partition: int) -> tuple[int, str] | None:
        """The commit point (offset, metadata) the partition was restored from or last
        committed."""
        tracker = self._offsets.tracked(topic, partition)
        return tracker.committed if tracker is not None else None

    def read_ahead(self, topic: str, partition: int) -> int:
        """How far beyond its commit point the partition has been read."""
        tracker = self._offsets.tracked(topic, partition)
        return tracker.read_ahead if tracker is not None else 0

    def next_to_read(self, topic: str, partition: int) -> int:
        """The offset after the last one read of the partition (0 before any)."""
        tracker = self._offsets.tracked(topic, partition)
        return tracker.next_to_read if tracker is not None else 0

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

    def in_flight(self, batch_id: str) -> Batch | None:
        """The batch of this process between intake and the ledger, if `batch_id` is one."""
        return self._in_flight.get(batch_id)

    def intent_seen(self, record: IntentRecord) -> None:
        """The ledger showed an intent for a batch in flight here (its own, or a renewal by
        another process that resolved it after the partitions moved)."""
        if record.batch_id in self._in_flight:
            known = self._intents_seen.get(record.batch_id)
            if known is None or record.attempt >= known.attempt:
                self._intents_seen[record.batch_id] = record

    def intent_seen_last(self, batch_id: str) -> IntentRecord | None:
        """The newest intent the ledger showed for `batch_id` while it was in flight."""
        return self._intents_seen.get(batch_id)

    def under_way_or_closed_here(self, batch_id: str) -> bool:
        """In flight, or recorded by this process with its intent's closure (which the
        ledger view may not have read back yet)."""
        return batch_id in self._in_flight or batch_id in self._closed_here

    def is_in_flight(self, batch_id: str) -> bool:
        """Whether `batch_id` is a batch of this process between intake and the ledger."""
        return batch_id in self._in_flight

    def handed_on(self, batch: Batch, *, intent_in_ledger: bool = False) -> None:
        """`batch` left intake for the uploaders, under the partitions' current owners.
        `intent_in_ledger`: a resolution of another process's intent (kept in flight at
        a rebalance deadline like a batch whose intent this process wrote: it may be
        sent, and must not be handed out a second time)."""
        self._in_flight[batch.batch_id] = batch
        if intent_in_ledger:
            self._intent_written.add(batch.batch_id)
        self._ownership.handed_on(batch)
        for part in batch.parts:
            if part.covered is not None:
                source = part.event.source
                tracker = self._offsets.tracked(source.topic, source.partition)
                if tracker is not None:
                    tracker.values_in_flight(source.offset, part.event.total, part.covered)
        self._settled.clear()

    def forget(self, batch_ids: Iterable[str]) -> None:
        """These batches were never sent (dropped at a rebalance, or abandoned): their
        events are read again, so nothing of them will be accounted for here."""
        for batch_id in batch_ids:
            batch = self._in_flight.pop(batch_id, None)
            self._intents_seen.pop(batch_id, None)
            self._intent_written.discard(batch_id)
            self._ownership.let_go(batch_id)
            if batch is not None:
                for part in batch.parts:
                    source = part.event.source
                    tracker = self._offsets.tracked(source.topic, source.partition)
                    if tracker is None:
                        continue
                    # Held in flight for it when the partition came back: read again now
                    # (still unaccounted, so the commit point stays below it).
                    tracker.in_flight_released(source.offset)
                    if part.covered is not None:
                        tracker.values_forgotten(source.offset, part.covered)
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

    # -- ownership (PartitionOwnership) ----------------------------------------------

    def revoked(self) -> None:
        """The group took every partition back: until the next assignment nothing is
        owned."""
        self._ownership.revoked()

    @property
    def between_assignments(self) -> bool:
        """Partitions revoked and not assigned again yet."""
        return self._ownership.between_assignments

    def assigned(self, partitions: Collection[tuple[str, int]], generation: int | None) -> None:
        """The group assigned `partitions` in `generation` (see PartitionOwnership)."""
        self._ownership.assigned(partitions, generation)

    def token(self, topic: str, partition: int) -> int | None:
        """The partition's ownership token now (None: not owned)."""
        return self._ownership.token(topic, partition)

    def owns_partition(self, topic: str, partition: int, token: int | None = None) -> bool:
        """Whether the partition is this intake's (under `token`, when given)."""
        return self._ownership.owns_partition(topic, partition, token)

    def owns(self, batch: Batch) -> bool:
        """Whether every partition of `batch`'s events is still this intake's, as it was
        when the batch was handed on: before every send, renewal, lookup and intent, the
        uploaders ask (a batch whose partitions moved is the new owner's to resolve)."""
        return self._ownership.owns(batch)

    # -- the committer (Accounting) -----------------------------------------------------

    def dead_lettered(self, topic: str, partition: int, offset: int) -> None:
        """The record is in the dead-letter topic."""
        self._offsets.accounted(topic, partition, offset)

    def claim_intent(self, batch_id: str) -> bool:
        """The committer is about to write `batch_id`'s intent: allowed only while the batch
        is this intake's, its partitions owned as when it was handed on (a rebalance
        forgets batches without an intent, whose events the partitions' next owner reads
        again)."""
        batch = self._in_flight.get(batch_id)
        if batch is None or not self.owns(batch):
            return False
        self._intent_written.add(batch_id)
        return True

    def batch_recorded(self, batch: Batch) -> None:
        """`batch` is recorded (or dead-lettered): what its parts cover is accounted for:
        a whole event, or some values of an event cut across batches (the event once all
        of its values are)."""
        self._in_flight.pop(batch.batch_id, None)
        self._intents_seen.pop(batch.batch_id, None)
        self._intent_written.discard(batch.batch_id)
        # Its intent's closure is in the same transaction, but the ledger view reads it
        # back only later: until then the intent is still open in intake's watch, and a
        # rebalance must not hand its resolution out again (`closed_here`).
        self._closed_here[batch.batch_id] = None
        if len(self._closed_here) > CLOSED_HERE_KEPT:
            del self._closed_here[next(iter(self._closed_here))]
        self._ownership.let_go(batch.batch_id)
        for part in batch.parts:
            source = part.event.source
            if part.covered is None:
                self._offsets.accounted(source.topic, source.partition, source.offset)
            else:
                tracker = self._offsets.tracked(source.topic, source.partition)
                if tracker is not None:
                    tracker.values_done(source.offset, part.event.total, part.covered)
        self._note_settled()

    def sources_done(self, sources: Iterable[Done | Source]) -> int:
        """Events recorded by position (an intent resolved here, or closed by another
        replica), whole or some of their values: accounted for where this intake tracks
        their partition, even if not read yet. Returns how many were."""
        count = 0
        for source in sources:
            values = getattr(source, "values", None)
            total = getattr(source, "total", None)
            if values is None or total is None:
                count += self._offsets.done(source.topic, source.partition, source.offset)
                continue
            tracker = self._offsets.tracked(source.topic, source.partition)
            if tracker is not None:
                tracker.values_done(source.offset, total, values)
                count += 1
        return count

    def checkpoints(self) -> dict[tuple[str, int], Checkpoint]:
        """Partitions whose progress changed: the offset, metadata and progress record to
        commit."""
        return self._offsets.checkpoints()

    def fence_points(self) -> dict[tuple[str, int], tuple[int, str]]:
        """The last commit point of every partition tracked."""
        return self._offsets.commit_points()

    def _note_settled(self) -> None:
        if not self._in_flight:
            self._settled.set()
