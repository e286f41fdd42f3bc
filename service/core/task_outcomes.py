"""The result record of a finished task: what the ledger said was sent, and what the
API says became of it (docs/design.md section 2.2).

Pure: the API's view is taken through `FinishedTask`, the time of publishing is given.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from service.core.records import TaskLedgerRecord, TaskOutcome, TaskState

if TYPE_CHECKING:
    from datetime import datetime


class FinishedTask(Protocol):
    """The API's view of a task that will not change again (the scantrust client's
    `ApiTask` is one)."""

    @property
    def finished_well(self) -> bool:
        """Complete; else failed."""

    @property
    def codes_affected(self) -> int | None: ...

    @property
    def created_at(self) -> datetime | None: ...

    @property
    def started_at(self) -> datetime | None: ...

    @property
    def completed_at(self) -> datetime | None: ...


def task_outcome(
    entry: TaskLedgerRecord,
    task: FinishedTask,
    api_details: dict[str, Any] | None = None,
    *,
    published_at: datetime,
) -> TaskOutcome:
    """The result record of a finished task: a complete task whose event said how many
    codes it should touch is short or over by the codes it missed or exceeded."""
    state = TaskState.COMPLETE if task.finished_well else TaskState.FAILED
    shortfall: int | None = None
    excess: int | None = None
    if state is TaskState.COMPLETE and entry.expected_codes is not None:
        shortfall = max(0, entry.expected_codes - (task.codes_affected or 0))
        excess = max(0, (task.codes_affected or 0) - entry.expected_codes)
    return TaskOutcome(
        task_id=entry.task_id,
        state=state,
        codes_affected=task.codes_affected,
        expected_codes=entry.expected_codes,
        shortfall=shortfall,
        short=bool(shortfall),
        excess=excess,
        over=bool(excess),
        api_details=api_details,
        campaign=entry.campaign,
        reference=entry.reference,
        scm_data=entry.scm_data,
        constraints=entry.constraints,
        events=entry.events,
        submitted_at=entry.submitted_at,
        created_at=task.created_at,
        started_at=task.started_at,
        completed_at=task.completed_at,
        published_at=published_at,
    )
