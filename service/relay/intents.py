"""Intake's view of the open intents other processes wrote (docs/design.md section 11).

An intent in the ledger says: "these events are in an upload its writer may still
send". Until it closes, nobody else may send them: intake holds every event the
intent covers when it reads it (the order guard holds other changes to the same
codes). When the intent closes, the held events are done (the writer, or a
resolver, recorded them) or, for an event only partly inside the intent, read in
again. An intent whose writer is gone (a crash, a takeover, a fenced replica) is
resolved, once its `resolve_after` has passed, by the owner of the partition of
its first event: this module says which intents are due; the uploaders resolve
them.

Pure: no Kafka, no HTTP, no awaiting. Bounded by the open intents in the ledger
(the uploads in flight across the group, plus orphans until resolved) and the
events they cover.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Callable, Collection
from dataclasses import dataclass, field, replace
from datetime import datetime

from service.core.batching import Batch, Part, PendingEvent, Source
from service.core.records import IntentRecord

Position = tuple[str, int, int]
# Task tombstones remembered (see `LedgerTasks`): far more than the tasks that can end
# while an intent's closure is on its way through the ledger view.
RECENTLY_ENDED_KEPT = 10_000


def position(source: Source) -> Position:
    """Where an event is, without its event id."""
    return (source.topic, source.partition, source.offset)


@dataclass
class _Open:
    record: IntentRecord
    held: list[PendingEvent] = field(default_factory=list)
    resolving: bool = False


@dataclass(frozen=True)
class Closed:
    """What an intent's closure means here: events done, and events to read in again."""

    done: list[Source]
    readmit: list[PendingEvent]


class IntentWatch:
    """The open intents this process did not write, and the events they hold back."""

    def __init__(self) -> None:
        self._open: dict[str, _Open] = {}
        self._covering: dict[Position, list[str]] = {}

    def __len__(self) -> int:
        return len(self._open)

    def is_open(self, batch_id: str) -> bool:
        """Whether another process's intent for `batch_id` is open."""
        return batch_id in self._open

    def opened(self, record: IntentRecord) -> None:
        """An intent (or a renewal of one) was read from the ledger."""
        entry = self._open.get(record.batch_id)
        if entry is not None:
            entry.record = record
            return
        self._open[record.batch_id] = _Open(record)
        for source in record.events:
            key = (source.topic, source.partition, source.offset)
            self._covering.setdefault(key, []).append(record.batch_id)

    def hold(self, pending: PendingEvent) -> bool:
        """Hold `pending` if an open intent covers it; False if none does."""
        covering = self._covering.get(position(pending.source))
        if not covering:
            return False
        self._open[covering[0]].held.append(pending)
        return True

    def closed(self, batch_id: str) -> Closed:
        """An intent closed (recorded or rejected: either way its events are written
        somewhere): its held events that it wholly carried are done; those it carried in
        part (an event split across uploads) go to the next intent covering them, or are
        read in again."""
        entry = self._open.pop(batch_id, None)
        if entry is None:
            return Closed([], [])
        for source in entry.record.events:
            key = (source.topic, source.partition, source.offset)
            covering = self._covering.get(key)
            if covering is not None and batch_id in covering:
                covering.remove(batch_id)
                if not covering:
                    del self._covering[key]
        done: list[Source] = []
        readmit: list[PendingEvent] = []
        for pending in entry.held:
            if _wholly_inside(pending, entry.record):
                done.append(pending.source)
            elif not self.hold(pending):
                readmit.append(pending)
        return Closed(done, readmit)

    def due(
        self,
        now: datetime,
        owned: Collection[tuple[str, int]],
        is_done: Callable[[Source], bool],
    ) -> list[tuple[Batch, IntentRecord, list[Source]]]:
        """Intents past `resolve_after` that this intake resolves: it owns the partition
        of the first event, and holds (or has done) every event of the intent in its
        partitions. Each is handed out once, until `forget_resolving`."""
        ready = []
        for entry in self._open.values():
            record = entry.record
            first = record.events[0]
            if entry.resolving or now < record.resolve_after:
                continue
            if (first.topic, first.partition) not in owned:
                continue
            held = {position(pending.source) for pending in entry.held}
            mine = [s for s in record.events if (s.topic, s.partition) in owned]
            if any(
                (s.topic, s.partition, s.offset) not in held
                and not is_done(Source(s.topic, s.partition, s.offset))
                for s in mine
            ):
                continue
            entry.resolving = True
            # Held events only partly inside the intent are not done by its task: they are
            # read in again when it closes.
            partial = {position(p.source) for p in entry.held if not _wholly_inside(p, record)}
            sources = [
                Source(s.topic, s.partition, s.offset, s.event_id)
                for s in record.events
                if (s.topic, s.partition, s.offset) not in partial
            ]
            ready.append((resolution_batch(record, entry.held), record, sources))
        return ready

    def forget_held(self) -> int:
        """The partitions were revoked: held events are read again by their next owner,
        and resolutions not under way are handed out again. Returns the events dropped."""
        dropped = 0
        for entry in self._open.values():
            dropped += len(entry.held)
            entry.held.clear()
            entry.resolving = False
        return dropped

    def claims(self) -> list[IntentRecord]:
        """Every open intent (their codes are claimed by the order guard)."""
        return [entry.record for entry in self._open.values()]


def resolution_batch(record: IntentRecord, held: list[PendingEvent]) -> Batch:
    """A batch carrying the intent's request (its constraints and scm_data, sent again
    exactly) and, as parts without values, the events of it this intake holds (their
    bytes for dead letters)."""
    batch = Batch(
        group=(
            record.campaign,
            tuple(sorted(record.scm_data.items())),
            record.reference,
            None,
        ),
        opened_at=0.0,
        batch_id=record.batch_id,
    )
    for key, values in record.constraints.items():
        batch.values[key] = dict.fromkeys(values)
        batch.size += len(values)
    # Copies: the parts only lend their bytes to dead letters; the held events keep their
    # own part counts for when they are read in again.
    batch.parts = [
        Part(replace(p, parts=0, parts_done=0), next(iter(p.event.constraints)), ()) for p in held
    ]
    return batch


def _wholly_inside(pending: PendingEvent, record: IntentRecord) -> bool:
    """Whether every value of the event, under each of its keys, is among the intent's
    constraint values of that key (an event with several keys is always carried whole)."""
    for key, values in pending.event.constraints.items():
        carried = record.constraints.get(key)
        if carried is None or not set(values).issubset(carried):
            return False
    return True


class LedgerTasks:
    """The unfinished tasks in the ledger, by the batch whose claim they hold.

    An intent and its closure share one ledger partition, its tasks' records and
    tombstones sit in others: the ledger view may tell of a tombstone before the
    intent it closed, or of a closure before its task. The closure names its task
    ids, so a claim passes from an intent to its tasks in whatever order they are
    read; recent tombstones are remembered (bounded, oldest dropped) so that a late
    closure does not claim for a task that already ended."""

    def __init__(self) -> None:
        self._batch_of: dict[str, str] = {}  # unfinished task id -> batch id
        self._per_batch: Counter[str] = Counter()
        self._recently_ended: OrderedDict[str, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._batch_of)

    def started(self, task_id: str, batch_id: str, *, named_by_closure: bool = False) -> None:
        """A task record, or an intent's closure naming it (read perhaps after the task's
        tombstone): the task holds the batch's claim."""
        if named_by_closure and task_id in self._recently_ended:
            return
        if task_id not in self._batch_of:
            self._batch_of[task_id] = batch_id
            self._per_batch[batch_id] += 1

    def ended(self, task_id: str) -> str | None:
        """A task's tombstone; the batch whose claim it held, if it was known."""
        self._recently_ended[task_id] = None
        if len(self._recently_ended) > RECENTLY_ENDED_KEPT:
            self._recently_ended.popitem(last=False)
        batch_id = self._batch_of.pop(task_id, None)
        if batch_id is not None:
            self._per_batch[batch_id] -= 1
        return batch_id

    def running(self, batch_id: str) -> bool:
        """Whether a task of `batch_id` is unfinished; forgets the batch when none is."""
        if self._per_batch[batch_id] > 0:
            return True
        self._per_batch.pop(batch_id, None)
        return False
