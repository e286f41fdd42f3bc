"""Intake's view of the open intents other processes wrote (docs/design.md section 11).

An intent in the ledger says: "these events are in an upload its writer may still
send". Until it closes, nobody else may send them: intake defers every event the
intent covers when it reads it (the order guard holds other changes to the same
codes back). When the intent closes, what it carried is done (the writer, or a
resolver, recorded it), whether intake has read the event yet or not: an event
read late is skipped then; an event only partly inside the intent is read in
again without the values it carried. Closures are remembered a while (bounded), so
that a partition assigned later skips what they carried too. An intent whose
writer is gone (a crash, a takeover, a fenced replica) is resolved, once its
`resolve_after` has passed, by the owner of the partition of its first event: this
module says which intents are due; the uploaders resolve them.

Pure: no Kafka, no HTTP, no awaiting. Bounded by the open intents in the ledger
(the uploads in flight across the group, plus orphans until resolved) and the
events they cover.
"""

from __future__ import annotations

from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Final

from service.core.batching import Batch, Done, Part, PendingEvent, Source
from service.core.records import EventSource, IntentRecord

Position = tuple[str, int, int]
# Task tombstones remembered (see `LedgerTasks`): far more than the tasks that can end
# while an intent's closure is on its way through the ledger view.
RECENTLY_ENDED_KEPT = 10_000
# Events of closed intents remembered for partitions assigned later (all partitions
# together): a new owner skips them even when the previous owner died before it
# committed them; far more than the events of the intents closed during a rebalance.
CLOSED_EVENTS_KEPT: Final = 100_000
# Batch ids of intents closed lately: a closure is final, and an uploader that gave its
# batch up after another process resolved and closed its intent must not open it again
# here (the new owner would resolve it once more and record its task twice).
CLOSED_INTENTS_KEPT: Final = 100_000


def position(source: Source) -> Position:
    """Where an event is, without its event id."""
    return (source.topic, source.partition, source.offset)


@dataclass
class _Open:
    record: IntentRecord
    deferred: list[PendingEvent] = field(default_factory=list)  # read, waiting for it
    resolving: bool = False


@dataclass(frozen=True)
class Closed:
    """What an intent's closure means here: what it carried is done (whole events, or
    some values of events cut across uploads), and the deferred events with values left
    to send are read in again."""

    done: list[Done]
    readmit: list[PendingEvent]
    # Deferred events another open intent covers too, now deferred behind it (its batch id).
    moved: list[tuple[str, PendingEvent]] = field(default_factory=list)


def carried(source: EventSource) -> Done:
    """What an intent or task carried of one event, by position."""
    values = tuple(source.values) if source.values is not None else None
    return Done(source.topic, source.partition, source.offset, values, source.total)


class IntentWatch:
    """The open intents this process did not write, and the events deferred behind them."""

    def __init__(self) -> None:
        self._open: dict[str, _Open] = {}
        self._covering: dict[Position, list[str]] = {}
        self._closed: deque[Done] = deque(maxlen=CLOSED_EVENTS_KEPT)
        self._closed_batches: dict[str, None] = {}  # oldest first

    def __len__(self) -> int:
        return len(self._open)

    def is_open(self, batch_id: str) -> bool:
        """Whether another process's intent for `batch_id` is open."""
        return batch_id in self._open

    def opened(self, record: IntentRecord) -> bool:
        """An intent (or a renewal of one) was read from the ledger, or an uploader of
        this process gave its batch up with it open: True when it is open here now. One
        closed already stays closed."""
        if record.batch_id in self._closed_batches:
            return False
        entry = self._open.get(record.batch_id)
        if entry is not None:
            # Only a newer attempt replaces it: an uploader here that gave its batch up
            # names the intent it wrote, which another owner's resend may have renewed.
            if (record.attempt, record.written_at) >= (
                entry.record.attempt,
                entry.record.written_at,
            ):
                entry.record = record
            return True
        self._open[record.batch_id] = _Open(record)
        for source in record.events:
            key = (source.topic, source.partition, source.offset)
            self._covering.setdefault(key, []).append(record.batch_id)
        return True

    def defer(self, pending: PendingEvent) -> str | None:
        """Defer `pending` until the open intent that covers it closes, if one does: the
        batch id of that intent (whose claim in the order guard must cover the whole
        event: values of it outside the intent wait too, and later changes to them must
        wait); None if none does."""
        covering = self._covering.get(position(pending.source))
        if not covering:
            return None
        self._open[covering[0]].deferred.append(pending)
        return covering[0]

    def closed(self, batch_id: str, *, recorded: bool, own: Sequence[Done] | None = None) -> Closed:
        """An intent closed: `recorded` (its tasks are in the ledger) or rejected (its
        events are dead letters, by the writer or the resolver). What it carried is done,
        read yet or not (an event partly inside it: those values, when recorded); deferred
        events with values left go to the next intent covering them, or are read in
        again. `own`: what this process's batch under that intent carries, when the
        batch is still in flight here (its partitions moved and their new owner resolved
        the intent): done as well, and remembered for the next assignment."""
        self._closed_batches[batch_id] = None
        if len(self._closed_batches) > CLOSED_INTENTS_KEPT:
            del self._closed_batches[next(iter(self._closed_batches))]
        entry = self._open.pop(batch_id, None)
        if entry is None:
            if own is None:
                return Closed([], [])
            done = [source for source in own if recorded or source.values is None]
            self._closed.extend(done)
            return Closed(done, [])
        record = entry.record
        for source in record.events:
            key = (source.topic, source.partition, source.offset)
            covering = self._covering.get(key)
            if covering is not None and batch_id in covering:
                covering.remove(batch_id)
                if not covering:
                    del self._covering[key]
        done = [carried(source) for source in record.events if recorded or source.values is None]
        self._closed.extend(done)
        whole = {(d.topic, d.partition, d.offset) for d in done if d.values is None}
        readmit: list[PendingEvent] = []
        moved: list[tuple[str, PendingEvent]] = []
        for pending in entry.deferred:
            if position(pending.source) in whole:
                continue
            behind = self.defer(pending)
            if behind is None:
                readmit.append(pending)
            else:
                moved.append((behind, pending))
        return Closed(done, readmit, moved)

    def closed_in(self, partitions: Collection[tuple[str, int]]) -> list[Done]:
        """What the intents closed lately carried in these partitions (just assigned)."""
        return [done for done in self._closed if (done.topic, done.partition) in partitions]

    def due(
        self,
        now: datetime,
        owned: Collection[tuple[str, int]],
        is_done: Callable[[Source], bool],
    ) -> list[tuple[Batch, IntentRecord, list[Done]]]:
        """Intents past `resolve_after` that this intake resolves: it owns the partition
        of the first event, and has deferred (or done) every event of the intent in its
        partitions. Each is handed out once, until `forget_resolving`."""
        ready = []
        for entry in self._open.values():
            record = entry.record
            first = record.events[0]
            if entry.resolving or now < record.resolve_after:
                continue
            if (first.topic, first.partition) not in owned:
                continue
            deferred = {position(pending.source) for pending in entry.deferred}
            mine = [s for s in record.events if (s.topic, s.partition) in owned]
            if any(
                (s.topic, s.partition, s.offset) not in deferred
                and not is_done(Source(s.topic, s.partition, s.offset))
                for s in mine
            ):
                continue
            entry.resolving = True
            # What the task (adopted or sent again) carries of each event, by position: an
            # event partly inside the intent has the rest of its values read in again.
            sources = [carried(source) for source in record.events]
            ready.append((resolution_batch(record, entry.deferred), record, sources))
        return ready

    def forget_deferred(self, under_way: Callable[[str], bool]) -> int:
        """The partitions were revoked: deferred events are read again by their next owner,
        and resolutions not `under_way` (dropped from the queue) are handed out again;
        one an uploader runs stays its own until it ends or is given up (`given_up`).
        Returns the events dropped."""
        dropped = 0
        for batch_id, entry in self._open.items():
            dropped += len(entry.deferred)
            entry.deferred.clear()
            if not under_way(batch_id):
                entry.resolving = False
        return dropped

    def needed_up_to(self, topic: str, partition: int) -> int | None:
        """The furthest offset of this partition an open intent covers: read up to it
        whatever the read-ahead bound says, or its resolver, which needs every event
        of the intent deferred, would wait behind a commit point that waits for it."""
        offsets = [
            source.offset
            for entry in self._open.values()
            for source in entry.record.events
            if source.topic == topic and source.partition == partition
        ]
        return max(offsets, default=None)

    def given_up(self, batch_id: str) -> None:
        """An uploader of this process gave up resolving `batch_id`'s intent (its
        partitions moved): whoever owns them next resolves it, this process included."""
        entry = self._open.get(batch_id)
        if entry is not None:
            entry.resolving = False

    def claims(self) -> list[IntentRecord]:
        """Every open intent (their codes are claimed by the order guard)."""
        return [entry.record for entry in self._open.values()]


def resolution_batch(record: IntentRecord, deferred: list[PendingEvent]) -> Batch:
    """A batch carrying the intent's request (its constraints and scm_data, sent again
    exactly) and, as parts without values, the events of it this intake deferred (their
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
    # Copies: the parts lend their bytes to dead letters and say what the intent carried
    # of each deferred event; they keep their own part counts.
    sources = {(s.topic, s.partition, s.offset): s for s in record.events}
    parts = []
    for pending in deferred:
        source = sources.get(position(pending.source))
        covered = tuple(source.values) if source and source.values is not None else None
        total = (source.total or 0) if source else 0
        copy = replace(pending, parts=0, total=total or pending.total)
        parts.append(Part(copy, next(iter(pending.event.constraints)), (), covered))
    batch.parts = parts
    return batch


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
