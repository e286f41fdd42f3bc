"""Which input offset may be committed, and what is already done above it.

Guarantee 1 (docs/guarantees.md): an offset is committed only when every event at or
below it is accounted for, i.e. inside a task recorded in the ledger or in the
dead-letter topic. Events finish in any order, so the committed offset of a partition
stops at the first hole.

Guarantee 3: what is done above the hole must never be sent again, whoever reads the
partition next. It travels whole, never cut, in the partition's *progress record*
(`progress:<topic>:<partition>` in the ledger), written in the same transaction as
the offsets: the offsets done above the commit point (a roaring bitmap), and, for
an event split across requests of which only some are recorded, which of its
values are done. The commit's metadata names the record it goes with
(`scm-relay:2:<digest>`), so that a new owner knows the record it read is the one
committed with the offset. (Before, the done offsets travelled in the metadata
itself, cut at 3 500 characters: scattered ones were lost, and their events sent
again after a crash; `decode_done` still reads that form, from an older relay.)

A partition is read at most `max_read_ahead` offsets beyond its commit point, so the
record and this tracker stay bounded (service/relay/reader.py pauses it there).
"""

from __future__ import annotations

import base64
import hashlib
import heapq
import json
from bisect import bisect_left
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final, NamedTuple

from pyroaring import BitMap

LEGACY_METADATA_PREFIX: Final = "scm-relay:1:"
METADATA_PREFIX: Final = "scm-relay:2:"


def decode_done(metadata: str | None) -> set[int]:
    """The offsets an older relay's commit metadata (`scm-relay:1:10-19,25`) says are
    done; anything else means none."""
    if not metadata or not metadata.startswith(LEGACY_METADATA_PREFIX):
        return set()
    done: set[int] = set()
    try:
        for item in metadata[len(LEGACY_METADATA_PREFIX) :].split(","):
            low, _, high = item.partition("-")
            done.update(range(int(low), int(high or low) + 1))
    except ValueError:
        return set()
    return done


class Progress(NamedTuple):
    """What is done at and above a partition's commit point."""

    commit: int
    done: tuple[int, ...]  # offsets above `commit` accounted for, ascending
    # offset -> (its values, the indexes of those done): events split across requests
    partial: Mapping[int, tuple[int, tuple[int, ...]]]


def _bitmap(values: Iterable[int]) -> str:
    return base64.b64encode(BitMap(values).serialize()).decode()


def _unbitmap(text: str) -> list[int]:
    return list(BitMap.deserialize(base64.b64decode(text)))


def encode_progress(topic: str, partition: int, progress: Progress) -> bytes:
    """The progress record's value: JSON, offsets relative to the commit point (32-bit
    roaring bitmaps, base64): bounded by the read-ahead bound, never cut."""
    document = {
        "schema_version": 1,
        "kind": "progress",
        "topic": topic,
        "partition": partition,
        "commit": progress.commit,
        "done": _bitmap(offset - progress.commit for offset in progress.done),
        "partial": {
            str(offset - progress.commit): {"values": total, "done": _bitmap(done)}
            for offset, (total, done) in sorted(progress.partial.items())
        },
    }
    return json.dumps(document, separators=(",", ":")).encode()


def decode_progress(raw: bytes) -> Progress:
    """A progress record's value (raises ValueError when it is not one)."""
    try:
        document = json.loads(raw)
        commit = int(document["commit"])
        done = tuple(commit + offset for offset in _unbitmap(document["done"]))
        partial = {
            commit + int(offset): (int(entry["values"]), tuple(_unbitmap(entry["done"])))
            for offset, entry in document["partial"].items()
        }
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"not a progress record: {exc}") from exc
    return Progress(commit, done, partial)


def progress_digest(raw: bytes) -> str:
    """What the commit metadata names its progress record by."""
    return hashlib.sha256(raw).hexdigest()[:16]


class Checkpoint(NamedTuple):
    """What to commit for one partition: its offset and metadata, and the value of its
    progress record (None: unchanged, a commit point committed again)."""

    offset: int
    metadata: str
    progress: bytes | None = None


class DoneOffsets:
    """Offsets above the commit point that are done: a set for the per-record lookup,
    and the same offsets in order for the progress record, sorted only when asked
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


@dataclass
class _Partial:
    """An event of which some values are done (recorded) or in flight, not all."""

    total: int
    done: set[int] = field(default_factory=set)
    in_flight: set[int] = field(default_factory=set)


class PartitionOffsets:
    """Received and accounted offsets of one partition, and the values done of events
    split across requests."""

    def __init__(self) -> None:
        self._pending: set[int] = set()
        self._heap: list[int] = []
        self._next_after_last: int | None = None
        self._done_above = DoneOffsets()
        self._in_flight: set[int] = set()
        self._partial: dict[int, _Partial] = {}
        self.committed: tuple[int, str] | None = None
        self._version = 0  # bumped whenever what a checkpoint would carry may change
        self._checkpointed = -1
        # Restored, its progress record not yet applied: no checkpoint until it is (one
        # now would write a record that forgets what the previous owner had done).
        self._restoring = False

    def restore(self, offset: int, metadata: str | None) -> None:
        """Take over the commit point a previous owner committed (and the done offsets
        of an older relay's metadata; a progress record comes with `apply`)."""
        self._done_above.update(decode_done(metadata))
        if self.committed is None:
            self.committed = (offset, metadata or "")
        if self._next_after_last is None:
            self._next_after_last = offset  # nothing read yet: the next is the commit point
        self._restoring = True
        self._version += 1

    def apply(self, progress: Progress | None) -> None:
        """What a progress record says is done at and above the commit point (None: the
        partition has none); checkpoints may follow from now on."""
        self._restoring = False
        self._version += 1
        if progress is None:
            return
        floor = self.committed[0] if self.committed is not None else progress.commit
        if progress.commit > floor:
            # The record is read only once its transaction committed, and the offsets
            # committed in it with it: below its commit point is done, even when the
            # commit point fetched is older (an offset fetch does not wait for a
            # transaction still open then, as aiokafka's OffsetFetch v3 does not). The
            # record's commit point becomes the committed one (no set of the offsets in
            # between: the gap is unbounded when the group's offsets expired).
            floor = progress.commit
            self.committed = (floor, self.committed[1] if self.committed else "")
            for offset in [o for o in self._partial if o < floor]:
                del self._partial[offset]
        self._done_above.update(o for o in progress.done if o >= floor)
        for offset, (total, done) in progress.partial.items():
            if offset >= floor and offset not in self._done_above:
                self.values_done(offset, total, done)
        # Events held in flight here (an upload of this process under way when the
        # partition came back) that the previous owner finished: accounted, or they
        # would hold the commit point for ever.
        for offset in [o for o in self._pending if o in self._done_above or o < floor]:
            self._pending.discard(offset)
            self._in_flight.discard(offset)
            self._partial.pop(offset, None)
        self._version += 1

    def done(self, offset: int) -> None:
        """The event at `offset` was recorded elsewhere (an intent another process wrote
        and a task adopted for it): accounted if read and pending, else skipped when read."""
        if offset in self._pending:
            self.accounted(offset)
        elif self._next_after_last is None or offset >= self._next_after_last:
            self._done_above.add(offset)
            self._partial.pop(offset, None)
            self._version += 1

    def mark_in_flight(self, offset: int) -> None:
        """The event at `offset` is in an upload of this process still under way when the
        partition is assigned to it again: skip it when read, and keep the commit point
        below it until its upload is accounted for."""
        if offset in self._done_above or (self.committed and offset < self.committed[0]):
            return  # done by the partition's owner meanwhile (it deferred it behind the intent)
        if offset not in self._pending:
            self._pending.add(offset)
            heapq.heappush(self._heap, offset)
        self._in_flight.add(offset)

    def in_flight_released(self, offset: int) -> None:
        """The upload `mark_in_flight` waited for was given up: the event is read (and
        taken) again, and stays unaccounted until then."""
        self._in_flight.discard(offset)

    def received(self, offset: int) -> bool:
        """A record at `offset` was read. True when it is already done or still in flight
        as a whole (skip it); otherwise it is unaccounted until `accounted(offset)` (or
        its values are all done). Of an event partly done, read `excluded` next."""
        if self._next_after_last is None or offset >= self._next_after_last:
            self._next_after_last = offset + 1
            # The commit point may pass it now (an event done before, read again).
            self._version += 1
        if offset in self._done_above or offset in self._in_flight:
            return True
        if self.committed is not None and offset < self.committed[0]:
            return True  # below a newer commit point than the one read from (`apply`)
        if offset not in self._pending:
            self._pending.add(offset)
            heapq.heappush(self._heap, offset)
        return False

    def excluded(self, offset: int) -> frozenset[int] | None:
        """The indexes of the values of the event at `offset` not to send again (done,
        or in an upload under way), or None when it has none."""
        partial = self._partial.get(offset)
        if partial is None:
            return None
        return frozenset(partial.done | partial.in_flight)

    def values_in_flight(self, offset: int, total: int, indexes: Iterable[int]) -> None:
        """Some values of the event at `offset` left in a batch (the rest did not)."""
        partial = self._partial.get(offset)
        if partial is None:
            partial = self._partial[offset] = _Partial(total)
        partial.in_flight.update(indexes)

    def values_forgotten(self, offset: int, indexes: Iterable[int]) -> None:
        """A batch carrying these values of the event at `offset` was dropped unsent."""
        partial = self._partial.get(offset)
        if partial is not None:
            partial.in_flight.difference_update(indexes)

    def values_done(self, offset: int, total: int, indexes: Iterable[int]) -> None:
        """These values of the event at `offset` are recorded; the event is accounted for
        once all of its values are."""
        if offset in self._done_above or (self.committed and offset < self.committed[0]):
            return
        partial = self._partial.get(offset)
        if partial is None:
            partial = self._partial[offset] = _Partial(total)
        partial.done.update(indexes)
        partial.in_flight.difference_update(partial.done)
        self._version += 1
        if len(partial.done) >= partial.total:
            if offset in self._pending:
                self.accounted(offset)
            else:
                self.done(offset)

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
        self._version += 1
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
            self._partial.pop(offset, None)
            self._done_above.add(offset)
            self._version += 1

    @property
    def unaccounted(self) -> int:
        """How many received events are not accounted for."""
        return len(self._pending)

    @property
    def next_to_read(self) -> int:
        """The offset after the last one read (or the restored commit point); 0 before."""
        return self._next_after_last if self._next_after_last is not None else 0

    @property
    def read_ahead(self) -> int:
        """How far beyond the commit point the partition has been read."""
        point = self.committable()
        if point is None or self._next_after_last is None:
            return 0
        return self._next_after_last - point

    def committable(self) -> int | None:
        """The offset to commit (the next to read): the lowest unaccounted offset, or one
        past the last received when all are accounted; None before any record. Never
        past what was read: events held in flight above the restored commit point (an
        upload of this process under way when the partition came back) do not move it
        over the offsets below them that are not read again yet."""
        while self._heap and self._heap[0] not in self._pending:
            heapq.heappop(self._heap)
        if self._heap:
            lowest: int = self._heap[0]
            if self._next_after_last is not None and self._next_after_last < lowest:
                return self._next_after_last
            return lowest
        return self._next_after_last

    def progress(self) -> Progress | None:
        """What is done at and above the commit point now; None before any record."""
        offset = self.committable()
        if offset is None:
            return None
        partial = {
            o: (p.total, tuple(sorted(p.done)))
            for o, p in self._partial.items()
            if o >= offset and p.done
        }
        return Progress(offset, tuple(self._done_above.from_(offset)), partial)

    def checkpoint(self, topic: str, partition: int) -> Checkpoint | None:
        """What to commit if the progress changed since the last commit: the offset, the
        metadata naming the progress record, and the record. The caller commits them in
        the transaction that records the events; the tracker remembers them."""
        if self._version == self._checkpointed or self._restoring:
            return None
        progress = self.progress()
        if progress is None:
            return None
        self._checkpointed = self._version
        if self.committed is not None and progress.commit < self.committed[0]:
            return None
        raw = encode_progress(topic, partition, progress)
        metadata = METADATA_PREFIX + progress_digest(raw)
        if self.committed == (progress.commit, metadata):
            return None
        self.committed = (progress.commit, metadata)
        return Checkpoint(progress.commit, metadata, raw)


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

    def tracked(self, topic: str, partition: int) -> PartitionOffsets | None:
        """The tracker of one partition, if it is tracked."""
        return self._partitions.get((topic, partition))

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

    def checkpoints(self) -> dict[tuple[str, int], Checkpoint]:
        """Every partition whose progress changed, with what to commit."""
        moved = {}
        for (topic, partition), tracker in self._partitions.items():
            point = tracker.checkpoint(topic, partition)
            if point is not None:
                moved[(topic, partition)] = point
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
