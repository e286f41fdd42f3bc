"""The typed messages stages send each other, and the one way they are handed over.

Each message has one receiver: `CommitItem`s go to the committer, `IntakeMessage`s
to intake, `LedgerChange`s to the task poller, batches and `Resolution`s to the
uploaders. Every hand-off is a bounded `Mailbox` its receiver owns: senders `tell`
(waiting while it is full) and the receiver takes what arrived in its own task; a
receiver that stops at the end of its stream (an uploader worker, the committer)
is ended by `Mailbox.end`, queued behind what was told before it.

A stage owns its state and changes no other stage's, but for four objects shared on
the one event loop, by calls that never await (no stage sees one half-changed);
docs/design.md section 9 says the same:
- intake's offset book (book.py): the committer marks what a transaction accounts
  for, and takes the offsets that releases, through `Accounting` (ports.py), and
  only inside its open transaction, so that the offsets travel with the records
  that account for them (guarantee 2): a message intake acted on later would
  commit them apart (tests/unit/relay/test_shared_book.py). The uploaders ask it
  whether a batch's partitions are still intake's (`owns`), and change nothing.
- `WrittenRecords` (ledger.py): the committer leaves the ledger records it wrote,
  the ledger view takes each back once instead of parsing it.
- `KnownTasks` (ledger.py): the ledger view and the uploaders note task ids,
  reconciliation reads them.
- `ApiHealth` (health.py): what the API answered, written by whoever called it
  (uploaders, task poller, the supervisor's check), read by intake and readiness.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from service.core.batching import Batch, Done, Source
from service.core.records import (
    DeadLetterHeaders,
    IntentRecord,
    TaskLedgerRecord,
    TaskOutcome,
    TaskProgress,
)
from service.scantrust.outcomes import Rejected

# -- to the committer ------------------------------------------------------------------


class BatchRevokedError(Exception):
    """A batch's intent was not written: a rebalance took its partitions before it was
    sent, and the partitions' next owner reads its events again."""


@dataclass
class IntentWrite:
    """A batch's intent, committed before its upload is sent; `written` resolves once
    committed (and fails if the transaction could not be)."""

    record: IntentRecord
    written: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    refused: bool = False  # the batch was revoked before its intent could be written


@dataclass
class LedgerAppend:
    """An uploaded batch's task(s), to record, closing the batch's intent in the same
    transaction; `recorded` resolves once committed.

    `more`: further tasks of the same batch (reconciliation found several). `sources`:
    for an intent resolved after its writer was gone, the events to account for by
    position (this process never batched them); otherwise the batch's own events."""

    record: TaskLedgerRecord
    batch: Batch
    more: list[TaskLedgerRecord] = field(default_factory=list)
    sources: list[Done] | None = None
    recorded: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    refused: bool = False  # the batch's partitions moved before it could be recorded


@dataclass
class DeadLetter:
    """An input record that failed decoding or validation."""

    source: Source
    raw: bytes
    key: bytes | None
    headers: DeadLetterHeaders
    # The ownership token of the source's partition when the record was judged (None:
    # the partition must be owned when it is committed, whatever its token).
    owner: int | None = None


@dataclass
class ApiRejection:
    """A batch the API refused: its events become dead letters with the API's answer,
    and its intent closes. `sources`: as for `LedgerAppend` (events of a resolved intent
    that this process does not hold are dead-lettered by position, without their bytes)."""

    batch: Batch
    outcome: Rejected
    sources: list[Done] | None = None


@dataclass(frozen=True)
class ResultFence:
    """Who may publish a task's result: the poller group's member under the generation it
    had when it polled the task (fencing.GroupGeneration), for the task's ledger
    partition. The committer commits results under it, so a replica whose ledger
    partitions moved while it was paused cannot publish a result the new owner publishes
    too."""

    group: str
    ledger_partition: int


@dataclass
class TaskFinished:
    """A task reached its end: its result, and its tombstone in the ledger. `done` runs
    once both are committed."""

    outcome: TaskOutcome
    done: Callable[[], None]
    fence: ResultFence | None = None


@dataclass
class Progress:
    """A progress record (a stuck task) for the results topic."""

    progress: TaskProgress
    fence: ResultFence | None = None


@dataclass
class Flush:
    """Resolves `flushed` once every item queued before it is committed; with
    `then_suspend`, the committer starts no further transaction until it is resumed."""

    then_suspend: bool = False
    # Which rebalance the suspension is for: one whose flush outlived the revoke's
    # deadline and the next assignment (`resume`) must not suspend the committer again.
    suspend_round: int = 0
    flushed: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


CommitItem = (
    IntentWrite | LedgerAppend | DeadLetter | ApiRejection | TaskFinished | Progress | Flush
)


# -- to the uploaders ------------------------------------------------------------------


@dataclass
class Resolution:
    """An open intent whose writer is gone, for this intake to resolve: `batch` carries
    the intent's request and, as parts without values, the events of it intake holds
    (their bytes for dead letters); `sources` are the events its task accounts for."""

    batch: Batch
    intent: IntentRecord
    sources: list[Done]


# -- to intake -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TaskRecorded:
    """The ledger holds an unfinished task (this replica's or another's): its codes are
    claimed until it ends."""

    task_id: str
    batch_id: str
    constraints: Mapping[str, list[str]]
    scm_data: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class TaskEnded:
    """A task's tombstone: its claims end."""

    task_id: str


@dataclass(frozen=True, slots=True)
class IntentOpened:
    """The ledger holds an intent: its events are not to be sent by anyone but its
    writer, and its codes are claimed, until it closes."""

    record: IntentRecord


@dataclass(frozen=True, slots=True)
class IntentClosed:
    """An intent closed: its events are done (recorded or dead-lettered)."""

    batch_id: str
    task_ids: tuple[str, ...] = ()  # its tasks, when it was recorded


@dataclass(frozen=True, slots=True)
class LedgerCaughtUp:
    """Every unfinished task in the ledger at start-up has been sent as `TaskRecorded`."""

    unfinished_tasks: int


@dataclass(frozen=True)
class BatchAbandoned:
    """The uploaders gave a batch up: its partitions are no longer this intake's (a
    rebalance gave them to another member), or the shutdown deadline passed. Its events
    are read again by whoever owns them; its intent, when one was written, stays open in
    the ledger, and whoever owns the first event's partition after `resolve_after`
    resolves it (this intake too: it watches it as another process's)."""

    batch_id: str
    intent: IntentRecord | None


@dataclass(frozen=True, slots=True)
class BatchRejected:
    """The API refused a batch (its dead letters are on their way): its claims end."""

    batch_id: str


IntakeMessage = (
    TaskRecorded
    | TaskEnded
    | LedgerCaughtUp
    | BatchRejected
    | BatchAbandoned
    | IntentOpened
    | IntentClosed
)


# -- to the task poller ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LedgerChange:
    """One ledger record as read: a task (`record`) or its tombstone (`record` None)."""

    partition: int
    task_id: str
    record: TaskLedgerRecord | None


# -- addresses -------------------------------------------------------------------------

Message = TypeVar("Message")
Told = TypeVar("Told", contravariant=True)


@dataclass(frozen=True, slots=True)
class EndOfStream:
    """Queued by `Mailbox.end` after what was told before it: the receiver that takes
    it stops taking (one per receiving worker)."""


class Inbox(Protocol[Told]):
    """A stage's inbox as a sender sees it: what it may tell the stage."""

    async def tell(self, message: Told) -> None:
        """Deliver `message`; waits while the inbox is full."""


class Mailbox(Generic[Message]):
    """A stage's bounded inbox: senders `tell` (waiting while it is full), the owning
    stage takes what arrived in its own task. A sender ends a stage that stops at the
    end of its stream with `end`, which takes a place in the inbox like a message."""

    def __init__(self, size: int) -> None:
        self._queue: asyncio.Queue[Message | EndOfStream] = asyncio.Queue(maxsize=size)

    async def tell(self, message: Message) -> None:
        """Deliver `message`; waits while the inbox is full."""
        await self._queue.put(message)

    async def end(self) -> None:
        """Queue the end of the stream after what was told; waits while the inbox is full."""
        await self._queue.put(EndOfStream())

    @property
    def empty(self) -> bool:
        """Nothing waits in the inbox (no message, no end)."""
        return self._queue.empty()

    async def next(self) -> Message | EndOfStream:
        """The oldest message (or end), waiting for one."""
        return await self._queue.get()

    def waiting(self, limit: int) -> list[Message | EndOfStream]:
        """What waits now, oldest first, at most `limit` (ends included)."""
        taken: list[Message | EndOfStream] = []
        while len(taken) < limit and not self._queue.empty():
            taken.append(self._queue.get_nowait())
        return taken

    def take_all(self) -> list[Message]:
        """Every message waiting now, oldest first; an end waiting among them is taken
        and dropped."""
        taken = []
        while not self._queue.empty():
            message = self._queue.get_nowait()
            if not isinstance(message, EndOfStream):
                taken.append(message)
        return taken

    async def take(self, timeout_s: float) -> list[Message]:
        """What arrives within `timeout_s` (at least one message, or none at the timeout;
        an end is dropped, as by `take_all`)."""
        try:
            async with asyncio.timeout(timeout_s):
                first = await self._queue.get()
        except TimeoutError:
            return []
        rest = self.take_all()
        return rest if isinstance(first, EndOfStream) else [first, *rest]
