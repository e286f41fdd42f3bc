"""The typed messages stages send each other over their bounded queues.

Each message has one receiver: `CommitItem`s go to the committer, `IntakeMessage`s
to intake, `LedgerChange`s to the task poller. A stage never changes another
stage's state; it sends one of these and the owner acts on it in its own task.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from service.core.batching import Batch, Source
from service.core.records import DeadLetterHeaders, TaskLedgerRecord, TaskOutcome, TaskProgress
from service.scantrust.outcomes import Rejected

# -- to the committer ------------------------------------------------------------------


@dataclass
class LedgerAppend:
    """An uploaded batch's task, to record; `recorded` resolves once committed."""

    record: TaskLedgerRecord
    batch: Batch
    # False for a second task of the same batch (reconciliation found several): the
    # first record accounts for the batch's events.
    accounts: bool = True
    recorded: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


@dataclass
class DeadLetter:
    """An input record that failed decoding or validation."""

    source: Source
    raw: bytes
    key: bytes | None
    headers: DeadLetterHeaders


@dataclass
class ApiRejection:
    """A batch the API refused: its events become dead letters with the API's answer."""

    batch: Batch
    outcome: Rejected


@dataclass
class TaskFinished:
    """A task reached its end: its result, and its tombstone in the ledger. `done` runs
    once both are committed."""

    outcome: TaskOutcome
    done: Callable[[], None]


@dataclass
class Progress:
    """A progress record (a stuck task) for the results topic."""

    progress: TaskProgress


@dataclass
class Flush:
    """Resolves `flushed` once every item queued before it is committed."""

    flushed: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


CommitItem = LedgerAppend | DeadLetter | ApiRejection | TaskFinished | Progress | Flush


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
class LedgerCaughtUp:
    """Every unfinished task in the ledger at start-up has been sent as `TaskRecorded`."""

    unfinished_tasks: int


@dataclass(frozen=True, slots=True)
class BatchRejected:
    """The API refused a batch (its dead letters are on their way): its claims end."""

    batch_id: str


IntakeMessage = TaskRecorded | TaskEnded | LedgerCaughtUp | BatchRejected


# -- to the task poller ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LedgerChange:
    """One ledger record as read: a task (`record`) or its tombstone (`record` None)."""

    partition: int
    task_id: str
    record: TaskLedgerRecord | None


# -- addresses -------------------------------------------------------------------------

Message = TypeVar("Message")


class Mailbox(Generic[Message]):
    """A stage's bounded inbox: senders `tell` (waiting while it is full), the owning
    stage takes what arrived in its own task."""

    def __init__(self, size: int) -> None:
        self._queue: asyncio.Queue[Message] = asyncio.Queue(maxsize=size)

    async def tell(self, message: Message) -> None:
        """Deliver `message`; waits while the inbox is full."""
        await self._queue.put(message)

    def take_all(self) -> list[Message]:
        """Every message waiting now, oldest first."""
        taken = []
        while not self._queue.empty():
            taken.append(self._queue.get_nowait())
        return taken

    async def take(self, timeout_s: float) -> list[Message]:
        """What arrives within `timeout_s` (at least one message, or none at the end)."""
        try:
            async with asyncio.timeout(timeout_s):
                first = await self._queue.get()
        except TimeoutError:
            return []
        return [first, *self.take_all()]
