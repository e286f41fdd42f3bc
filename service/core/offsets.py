"""Which input offset may be committed, and which offsets above it are already done.

Guarantee 1 (docs/guarantees.md): an offset is committed only when every event
at or below it is accounted for, i.e. inside a task recorded in the ledger or in
the dead-letter topic. Events finish in any order, so the committed offset of
a partition stops at the first hole.

Events above the hole that are already accounted for must not be sent again
after a restart (guarantee 3). Their offsets travel in the commit's metadata,
in the same transaction: `scm-relay:1:10-19,25` says offsets 10 to 19 and 25 are
done. A new owner of the partition restores them and skips those records.
"""

from __future__ import annotations

import heapq
from bisect import bisect_left
from collections.abc import Iterable, Iterator
from typing import Final

METADATA_PREFIX: Final = "scm-relay:1:"
# Kafka's default offset.metadata.max.bytes is 4096; stay well inside it. Ranges that do
# not fit are left out: those events may be sent again after a crash, never lost.
MAX_METADATA_CHARS: Final = 3500


def _ranges(offsets: list[int]) -> Iterator[tuple[int, int]]:
    """The (low, high) runs of consecutive numbers in sorted, distinct `offsets`, lowest
    first. A run's end is found by galloping (offsets[j] - offsets[i] == j - i holds
    exactly inside a run), so a long run costs a few steps, not one per offset."""
    start, count = 0, len(offsets)
    while start < count:
        low = offsets[start]
        inside, step = start, 1  # offsets[start..inside] are consecutive
        while inside + step < count and offsets[inside + step] - low == inside + step - start:
            inside += step
            step *= 2
        outside = min(inside + step, count)  # the first index known not to be inside
        while outside - inside > 1:
            middle = (inside + outside) // 2
            if offsets[middle] - low == middle - start:
                inside = middle
            else:
                outside = middle
        yield low, offsets[inside]
        start = inside + 1


def encode_done(offsets: list[int]) -> str:
    """`scm-relay:1:` and the sorted offsets as ranges (`10-19,25`), bounded in length;
    the lowest ranges are kept, as they are the next to be re-read. Reads only as many
    offsets as the ranges that fit cover."""
    parts: list[str] = []
    length = len(METADATA_PREFIX)
    for low, high in _ranges(offsets):
        text = str(low) if low == high else f"{low}-{high}"
        if length + len(text) + 1 > MAX_METADATA_CHARS:
            break
        parts.append(text)
        length += len(text) + 1
    return METADATA_PREFIX + ",".join(parts) if parts else ""


def decode_done(metadata: str | None) -> set[int]:
    """The offsets a commit's metadata says are done; anything unreadable means none."""
    if not metadata or not metadata.startswith(METADATA_PREFIX):
        return set()
    done: set[int] = set()
    try:
        for item in metadata[len(METADATA_PREFIX) :].split(","):
            low, _, high = item.partition("-")
            done.update(range(int(low), int(high or low) + 1))
    except ValueError:
        return set()
    return done


class DoneOffsets:
    """Offsets above the commit point that are done: a set for the per-record lookup,
    and the same offsets in order for the commit's metadata, sorted only when asked
    (new ones are appended and merged in then: Timsort merges the two runs in one pass)."""

    def __init__(self) -> None:
        self._members: set[int] = set()
        self._ordered: list[int] = []
        self._unordered: list[int] = []

    def __contains__(self, offset: int) -> bool:
        return offset in self._members

    def add(self, offset: int) -> None:
        """`offset` is done."""
        if offset not in self._members:
            self._members.add(offset)
            self._unordered.append(offset)

    def update(self, offsets: Iterable[int]) -> None:
        """Each of `offsets` is done."""
        for offset in offsets:
            self.add(offset)

    def from_(self, offset: int) -> list[int]:
        """The done offsets at or above `offset`, ascending; those below are forgotten
        (the commit point passed them). The list is this object's own: do not modify."""
        if self._unordered:
            self._ordered += self._unordered
            self._unordered.clear()
            self._ordered.sort()
        below = bisect_left(self._ordered, offset)
        if below:
            self._members.difference_update(self._ordered[:below])
            del self._ordered[:below]
        return self._ordered


class PartitionOffsets:
    """Received and accounted offsets of one partition."""

    def __init__(self) -> None:
        self._pending: set[int] = set()
        self._heap: list[int] = []
        self._next_after_last: int | None = None
        self._done_above = DoneOffsets()
        self._in_flight: set[int] = set()
        self.committed: tuple[int, str] | None = None

    def restore(self, offset: int, metadata: str | None) -> None:
        """Take over the commit point a previous owner committed, with its done offsets."""
        self._done_above.update(decode_done(metadata))
        if self.committed is None:
            self.committed = (offset, metadata or "")

    def done(self, offset: int) -> None:
        """The event at `offset` was recorded elsewhere (an intent another process wrote
        and a task adopted for it): accounted if read and pending, else skipped when read."""
        if offset in self._pending:
            self.accounted(offset)
        elif self._next_after_last is None or offset >= self._next_after_last:
            self._done_above.add(offset)

    def hold_in_flight(self, offset: int) -> None:
        """The event at `offset` is in an upload of this process still under way when the
        partition is assigned to it again: skip it when read, and keep the commit point
        below it until its upload is accounted for."""
        if offset in self._done_above or (self.committed and offset < self.committed[0]):
            return  # done by the partition's owner meanwhile (it held it behind the intent)
        if offset not in self._pending:
            self._pending.add(offset)
            heapq.heappush(self._heap, offset)
        self._in_flight.add(offset)

    def received(self, offset: int) -> bool:
        """A record at `offset` was read. True when it is already done or still in flight
        (skip it); otherwise it is unaccounted until `accounted(offset)`."""
        if self._next_after_last is None or offset >= self._next_after_last:
            self._next_after_last = offset + 1
        if offset in self._done_above or offset in self._in_flight:
            return True
        if offset not in self._pending:
            self._pending.add(offset)
            heapq.heappush(self._heap, offset)
        return False

    def read_to(self, position: int) -> bool:
        """The consumer stands at `position` having handed out every record below it,
        and each was `received`. Offsets between the last record and `position` hold no
        event: transaction markers, or records of aborted transactions, which a
        read_committed consumer skips. The commit point may pass them (else a partition
        a transactional publisher writes to shows a lag of one for ever). True when the
        commit point moved: nothing is pending."""
        floor = self._next_after_last
        if floor is None and self.committed is not None:
            floor = self.committed[0]
        if floor is None or position <= floor:
            return False
        self._next_after_last = position
        return not self._pending

    def is_done(self, offset: int) -> bool:
        """Accounted for, or below the commit point."""
        if offset in self._done_above:
            return True
        if self.committed is not None and offset < self.committed[0]:
            return True
        point = self.committable()
        return offset not in self._pending and point is not None and offset < point

    def accounted(self, offset: int) -> None:
        """The event at `offset` is in a recorded task or dead-lettered."""
        if offset in self._pending:
            self._pending.discard(offset)
            self._in_flight.discard(offset)
            self._done_above.add(offset)

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

    def checkpoint(self) -> tuple[int, str] | None:
        """The (offset, metadata) to commit if either changed since the last commit.

        The caller commits it in the transaction that records the events; the tracker
        remembers it as committed.
        """
        offset = self.committable()
        if offset is None:
            return None
        point = (offset, encode_done(self._done_above.from_(offset)))
        if self.committed is not None and (point == self.committed or offset < self.committed[0]):
            return None
        self.committed = point
        return point


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

    def reset(self, topic: str, partition: int) -> PartitionOffsets:
        """A fresh tracker for the partition, replacing what was known of it."""
        tracker = self._partitions[(topic, partition)] = PartitionOffsets()
        return tracker

    def received(self, topic: str, partition: int, offset: int) -> bool:
        """See `PartitionOffsets.received` (called for every record: one lookup)."""
        tracker = self._partitions.get((topic, partition))
        if tracker is None:
            tracker = self.partition(topic, partition)
        return tracker.received(offset)

    def accounted(self, topic: str, partition: int, offset: int) -> None:
        """See `PartitionOffsets.accounted`; unknown partitions (revoked) are ignored."""
        tracker = self._partitions.get((topic, partition))
        if tracker is not None:
            tracker.accounted(offset)

    def done(self, topic: str, partition: int, offset: int) -> bool:
        """See `PartitionOffsets.done`; False (nothing done) for a partition not tracked."""
        tracker = self._partitions.get((topic, partition))
        if tracker is None:
            return False
        tracker.done(offset)
        return True

    def read_to(self, topic: str, partition: int, position: int) -> bool:
        """See `PartitionOffsets.read_to`; False for a partition not tracked."""
        tracker = self._partitions.get((topic, partition))
        return tracker is not None and tracker.read_to(position)

    def is_done(self, topic: str, partition: int, offset: int) -> bool:
        """See `PartitionOffsets.is_done`; False for a partition not tracked."""
        tracker = self._partitions.get((topic, partition))
        return tracker is not None and tracker.is_done(offset)

    def commit_points(self) -> dict[tuple[str, int], tuple[int, str]]:
        """The last commit point of every partition that has one (committed again to
        fence a transaction in which no offset moved)."""
        return {
            key: tracker.committed
            for key, tracker in self._partitions.items()
            if tracker.committed is not None
        }

    def checkpoints(self) -> dict[tuple[str, int], tuple[int, str]]:
        """Every partition whose commit point changed, with its (offset, metadata)."""
        moved = {}
        for key, tracker in self._partitions.items():
            point = tracker.checkpoint()
            if point is not None:
                moved[key] = point
        return moved

    def keep_only(self, partitions: set[tuple[str, int]]) -> None:
        """Forget every partition but these (the others went to another consumer)."""
        for key in list(self._partitions):
            if key not in partitions:
                del self._partitions[key]

    @property
    def unaccounted(self) -> int:
        """Unaccounted events over all partitions."""
        return sum(tracker.unaccounted for tracker in self._partitions.values())
