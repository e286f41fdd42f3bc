"""The ledger view: reads the whole compacted ledger (every partition, no consumer
group) and tells the two stages that follow it what changed.

The ledger is read once per process and each record parsed once: intake learns
of unfinished tasks (its order guard claims their codes) and of their ends; the
task poller learns of every task and tombstone, by ledger partition. Records
this process wrote itself come back from the committer's `WrittenRecords`
instead of being parsed again. And it notes every task id it reads (records,
tombstones, intent closures) in `KnownTasks`, which reconciliation reads.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Mapping
from typing import Annotated, Final, Protocol

import structlog
from aiokafka import TopicPartition
from pydantic import Field, TypeAdapter, ValidationError

from service.core.records import (
    INTENT_KEY_PREFIX,
    PROGRESS_KEY_PREFIX,
    IntentClosure,
    IntentRecord,
    TaskLedgerRecord,
    progress_key,
)
from service.kafka import UndecodableRecordsError
from service.metrics import RelayMetrics
from service.relay.messages import (
    Inbox,
    IntentClosed,
    IntentOpened,
    LedgerCaughtUp,
    LedgerChange,
    TaskEnded,
    TaskRecorded,
)
from service.relay.ports import FetchedRecord, LedgerConsumer
from service.relay.stopped import StoppedPartitions

log = structlog.get_logger(__name__)

# The task ids `KnownTasks` keeps (the last noted; about 16 MB at this size). The API
# takes at most 10 uploads a second per account: 100 000 tasks are at least 2.7 hours
# of them, far beyond the window in which reconciliation considers an earlier task
# (reconcile.ASSUMED_CLOCK_SKEW before a batch's first send, plus the lookup's wait).
KNOWN_TASKS_MAX: Final = 100_000


class KnownTasks:
    """The tasks the relay has recorded, as far as this process knows: every task id the
    ledger view read (a task record, a tombstone, an intent closure naming it) and every
    record this process's uploaders handed to the committer (known before the view reads
    it back), with the batch it was recorded for (None when only a tombstone said so).

    Written by the ledger view and the uploaders, read by reconciliation (a read-only
    view for it: `reconcile.RecordedTasks`); all on one event loop, never across an
    await. Bounded: the last `KNOWN_TASKS_MAX` noted (least recently noted first out).
    A task the ledger no longer holds when this process starts (compacted with its
    tombstone and closure, after `delete.retention.ms`) is not known; only the
    `created_at` bound then keeps it out (docs/design.md section 10)."""

    def __init__(self, limit: int = KNOWN_TASKS_MAX) -> None:
        self._limit = limit
        # task id -> hash of its batch id (a third of the memory of the id itself; two
        # batch ids of one process colliding in 64 bits is not a concern), oldest first
        self._batches: dict[str, int | None] = {}

    def note(self, task_id: str, batch_id: str | None) -> None:
        """`task_id` is recorded (for `batch_id`, when the record says)."""
        known = self._batches.pop(task_id, None)
        self._batches[task_id] = known if batch_id is None else hash(batch_id)
        if len(self._batches) > self._limit:
            del self._batches[next(iter(self._batches))]

    def recorded_for_another(self, task_id: str, batch_id: str) -> bool:
        """Whether `task_id` is known, and not as `batch_id`'s task (a tombstone alone
        names no batch: then it counts as another's)."""
        return task_id in self._batches and self._batches[task_id] != hash(batch_id)


class WrittenRecords:
    """Ledger records this process wrote and its ledger view has not read back yet.

    Bounded by the records of transactions not yet read back (a failed transaction
    stops the process, so none stays here for ever)."""

    def __init__(self) -> None:
        self._records: dict[str, TaskLedgerRecord] = {}
        # Intent keys are written several times (intent, renewals, closure): in order.
        self._intents: dict[str, deque[IntentRecord | IntentClosure]] = {}

    def remember_intent(self, key: str, entry: IntentRecord | IntentClosure) -> None:
        """`entry` is in the transaction being committed, under `key`."""
        self._intents.setdefault(key, deque()).append(entry)

    def take_intent(self, key: str) -> IntentRecord | IntentClosure | None:
        """The next entry written under `key`, once."""
        written = self._intents.get(key)
        if not written:
            return None
        entry = written.popleft()
        if not written:
            del self._intents[key]
        return entry

    def remember(self, record: TaskLedgerRecord) -> None:
        """`record` is in the transaction being committed."""
        self._records[record.task_id] = record

    def take(self, task_id: str) -> TaskLedgerRecord | None:
        """The record written for `task_id`, once."""
        return self._records.pop(task_id, None)


# What the ledger view tells intake, and the poller.
IntakeNews = TaskRecorded | TaskEnded | LedgerCaughtUp | IntentOpened | IntentClosed


class LedgerEnds(Protocol):
    """Where ledger partitions end, open transactions included (the poller's group
    member, which reads uncommitted)."""

    async def end_offsets(self, partitions: list[TopicPartition]) -> Mapping[TopicPartition, int]:
        """The high watermark of each partition."""


class LedgerView:
    """Follows the ledger from its beginning for the lifetime of the process, and
    answers whether it has caught up (intake asks it at each assignment: catch_up.py)."""

    def __init__(
        self,
        *,
        reader: LedgerConsumer,
        ends: LedgerEnds,
        written: WrittenRecords,
        intake: Inbox[IntakeNews],
        poller: Inbox[LedgerChange],
        metrics: RelayMetrics,
        clock: Callable[[], float],
        known: KnownTasks | None = None,
    ) -> None:
        self._reader = reader
        self._ends = ends
        self._topic = ""  # the ledger's, once the view has started reading
        self._written = written
        self.known = known if known is not None else KnownTasks()
        self._intake = intake
        self._poller = poller
        self._unfinished: set[str] = set()
        self._positions: dict[int, int] = {}
        self.caught_up = asyncio.Event()
        self._progress: dict[str, bytes] = {}  # the latest progress record of each key
        self.stopped = StoppedPartitions("ledger", metrics.partition_stopped, clock)

    def position(self, partition: int) -> int:
        """The offset up to which ledger partition `partition` has been read and told."""
        return self._positions.get(partition, 0)

    def progress(self, topic: str, partition: int) -> bytes | None:
        """The latest progress record of an input partition read so far."""
        return self._progress.get(progress_key(topic, partition))

    def partitions(self) -> list[int]:
        """The ledger's partitions (empty until the view has started reading)."""
        return sorted(self._positions)

    async def end_offsets(self) -> dict[int, int]:
        """Where every ledger partition ends now, open transactions included; empty while
        the view has not started (intake waits for the whole ledger then anyway)."""
        partitions = self.partitions()
        if not partitions:
            return {}
        ends = await self._ends.end_offsets([TopicPartition(self._topic, p) for p in partitions])
        return {tp.partition: end for tp, end in ends.items()}

    def has_read_to(self, ends: dict[int, int]) -> bool:
        """Whether the view has read and told every partition up to `ends`."""
        return all(self.position(p) >= end for p, end in ends.items())

    def partition_stopped(self) -> bool:
        """Whether a ledger partition is stopped at a record batch it cannot decode."""
        return bool(self.stopped)

    async def run(self) -> None:
        """Read for ever; `caught_up` is set once the ledger is read to its end."""
        reader = self._reader
        # Subscribed without a group: aiokafka assigns every partition, read from the start.
        while not reader.assignment():
            await reader.getmany(timeout_ms=100)
        partitions = sorted(reader.assignment())
        self._topic = partitions[0].topic
        await reader.seek_to_beginning(*partitions)
        while True:
            due = self.stopped.due()  # read again where they stopped; a failure pauses again
            if due:
                reader.resume(*due)
            try:
                batches = await reader.getmany(timeout_ms=200, max_records=5000)
            except UndecodableRecordsError as error:
                await self._undecodable(error, partitions)
                continue
            for tp, records in batches.items():
                for record in records:
                    await self._apply(tp, record)
                if records:
                    self.stopped.read_past(tp, records[-1].offset + 1)
            behind = False
            for tp in partitions:
                position = await reader.position(tp)
                self._positions[tp.partition] = position
                # To the high watermark, past any transaction a killed relay left open.
                highwater = reader.highwater(tp)
                behind |= highwater is None or position < highwater
            if not behind and not self.caught_up.is_set():
                log.info("ledger_read", unfinished_tasks=len(self._unfinished))
                await self._intake.tell(LedgerCaughtUp(len(self._unfinished)))
                self.caught_up.set()

    async def _undecodable(
        self, error: UndecodableRecordsError, partitions: list[TopicPartition]
    ) -> None:
        """Stop the partition whose record batch cannot be decoded (every partition, if
        aiokafka did not say which) and read every partition again from where this view
        had told it: aiokafka lost the records it drained in the failed call. While a
        ledger partition is stopped, intake reads nothing (it cannot know the intents and
        tasks past the batch); readiness and `scm_relay_partition_stopped` say which."""
        failed = partitions if error.partition is None else [error.partition]
        offset = error.offset if error.partition is not None else None
        for tp in failed:
            # No stepping here (read_to None): the ledger is the relay's own, written
            # uncompressed; a batch it cannot decode is a broken log, and intake waits.
            self.stopped.failed(tp, offset, error.cause, read_to=None)
        unread = [tp for tp in partitions if tp.partition not in self._positions]
        for tp in partitions:
            if tp.partition in self._positions:
                self._reader.seek(tp, self._positions[tp.partition])
        if unread:
            await self._reader.seek_to_beginning(*unread)
        self._reader.pause(*failed)

    async def _apply(self, tp: TopicPartition, record: FetchedRecord) -> None:
        task_id = record.key.decode() if record.key else ""
        if task_id.startswith(INTENT_KEY_PREFIX):
            await self._apply_intent(task_id, record.value)
            return
        if task_id.startswith(PROGRESS_KEY_PREFIX):
            # Kept as bytes: only a new owner of the partition reads one (intake, when
            # it takes the partition over), and there is one a partition and transaction.
            if record.value is not None:
                self._progress[task_id] = record.value
            return
        if record.value is None:
            self.known.note(task_id, None)
            self._unfinished.discard(task_id)
            await self._poller.tell(LedgerChange(tp.partition, task_id, None))
            await self._intake.tell(TaskEnded(task_id))
            return
        entry = self._written.take(task_id)
        if entry is None:
            try:
                entry = TaskLedgerRecord.model_validate_json(record.value)
            except ValidationError as exc:
                log.error("ledger_record_unreadable", task_id=task_id, error=str(exc)[:300])
                return
        self.known.note(task_id, entry.batch_id)
        self._unfinished.add(task_id)
        await self._poller.tell(LedgerChange(tp.partition, task_id, entry))
        await self._intake.tell(
            TaskRecorded(task_id, entry.batch_id, entry.constraints, entry.scm_data)
        )

    async def _apply_intent(self, key: str, value: bytes | None) -> None:
        """Intents and their closures go to intake only (the poller follows tasks); the
        tombstone after a closure says nothing new."""
        if value is None:
            return
        entry = self._written.take_intent(key)
        if entry is None:
            try:
                entry = _INTENT_ENTRY.validate_json(value)
            except ValidationError as exc:
                log.error("ledger_record_unreadable", key=key, error=str(exc)[:300])
                return
        if isinstance(entry, IntentRecord):
            await self._intake.tell(IntentOpened(entry))
        else:
            for task_id in entry.task_ids:
                self.known.note(task_id, entry.batch_id)
            await self._intake.tell(IntentClosed(entry.batch_id, tuple(entry.task_ids)))


_INTENT_ENTRY: Final = TypeAdapter(
    Annotated[IntentRecord | IntentClosure, Field(discriminator="kind")]
)
