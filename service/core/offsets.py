"""Which input offset may be committed: the lowest one not yet accounted for.

Guarantee 1 (docs/guarantees.md): an offset is committed only when every event
at or below it is accounted for, i.e. inside a task recorded in the ledger or
in the dead-letter topic. Events finish in any order (batches flush and
succeed out of order); the committable offset of a partition only ever moves
up to the first hole.
"""

from __future__ import annotations

import heapq


class PartitionOffsets:
    """Received and accounted offsets of one partition."""

    def __init__(self) -> None:
        self._pending: set[int] = set()
        self._heap: list[int] = []
        self._next_after_last: int | None = None
        self.committed: int | None = None

    def received(self, offset: int) -> None:
        """A record at `offset` was read; it is unaccounted until `accounted(offset)`."""
        if offset in self._pending:
            return
        self._pending.add(offset)
        heapq.heappush(self._heap, offset)
        if self._next_after_last is None or offset >= self._next_after_last:
            self._next_after_last = offset + 1

    def accounted(self, offset: int) -> None:
        """The event at `offset` is in a recorded task or dead-lettered."""
        self._pending.discard(offset)

    @property
    def unaccounted(self) -> int:
        """How many received events are not accounted for."""
        return len(self._pending)

    def committable(self) -> int | None:
        """The offset to commit (the next to read): the lowest unaccounted offset, or one
        past the last received when all are accounted; None before any record."""
        while self._heap and self._heap[0] not in self._pending:
            heapq.heappop(self._heap)
        if self._heap:
            return self._heap[0]
        return self._next_after_last

    def advance(self) -> int | None:
        """The committable offset if it moved past what was last committed, else None.

        The caller commits it (in a transaction) and the tracker remembers it.
        """
        offset = self.committable()
        if offset is None or (self.committed is not None and offset <= self.committed):
            return None
        self.committed = offset
        return offset


class OffsetTracker:
    """`PartitionOffsets` for every assigned (topic, partition)."""

    def __init__(self) -> None:
        self._partitions: dict[tuple[str, int], PartitionOffsets] = {}

    def partition(self, topic: str, partition: int) -> PartitionOffsets:
        """The tracker of one partition, created on first use."""
        key = (topic, partition)
        tracker = self._partitions.get(key)
        if tracker is None:
            tracker = self._partitions[key] = PartitionOffsets()
        return tracker

    def received(self, topic: str, partition: int, offset: int) -> None:
        """See `PartitionOffsets.received`."""
        self.partition(topic, partition).received(offset)

    def accounted(self, topic: str, partition: int, offset: int) -> None:
        """See `PartitionOffsets.accounted`; unknown partitions (revoked) are ignored."""
        tracker = self._partitions.get((topic, partition))
        if tracker is not None:
            tracker.accounted(offset)

    def advances(self) -> dict[tuple[str, int], int]:
        """Every partition whose committable offset moved, with its new offset."""
        moved = {}
        for key, tracker in self._partitions.items():
            offset = tracker.advance()
            if offset is not None:
                moved[key] = offset
        return moved

    def forget(self, partitions: set[tuple[str, int]] | None = None) -> None:
        """Drop partitions (all when None), e.g. when they are revoked."""
        if partitions is None:
            self._partitions.clear()
            return
        for key in partitions:
            self._partitions.pop(key, None)

    @property
    def unaccounted(self) -> int:
        """Unaccounted events over all partitions."""
        return sum(tracker.unaccounted for tracker in self._partitions.values())
