"""Reconciliation: after an ambiguous upload, find the task it may have created.

An upload whose fate is unknown (no answer before the timeout, a reset, a 5xx,
a 2xx without a task id) is never resent blindly. Once the original request
can no longer create a task (the request timeout has passed since its answer
or its timeout), the uploader asks the API for the tasks carrying the batch's
reference (`GET /api/v2/scm/tasks/?reference=…`, every page, each task once):

- a batch without a reference of its own is sent with a unique one,
  `scm-relay:<batch id>`, so every task found is this batch's;
- a batch carrying its events' reference shares it with other tasks, earlier
  batches' among them: a candidate must be created at or after the batch's first
  send less `ASSUMED_CLOCK_SKEW`, and must not be a task the relay recorded for
  another batch (`RecordedTasks`: the ledger as far as this process has read it,
  and what its own uploaders recorded); the candidates are read one by one
  (`GET /api/v2/scm/tasks/{id}/`) and kept when `details.constraints` and
  `details.scm_data` are exactly the request's.

Tasks found are adopted (recorded in the ledger as if the answer had come);
none found means the batch may be sent again.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, Final, Protocol

import structlog

from service.core.batching import Batch
from service.scantrust.client import UploadRequest
from service.scantrust.outcomes import ApiTask, Failure, TaskPage

log = structlog.get_logger(__name__)

REFERENCE_PREFIX: Final = "scm-relay:"
# A task's `created_at` is the API's clock, the batch's first send ours: candidates
# created up to this long before the first send still count. An assumption, not a
# measurement: the two clocks agree within it (a task of this batch stamped earlier
# would be missed, and the batch sent again). It also lets in earlier batches' tasks
# with the same reference and change created within it; `RecordedTasks` keeps those out.
ASSUMED_CLOCK_SKEW: Final = timedelta(minutes=5)


class TaskLookup(Protocol):
    """The reads reconciliation needs (the client retries them)."""

    async def list_tasks(
        self,
        *,
        state: str | None = None,
        reference: str | None = None,
        created_at: str | None = None,
    ) -> TaskPage | Failure:
        """Every task with these filters, all pages."""

    async def task(self, task_id: str) -> ApiTask | Failure:
        """One task, with its details."""


class RecordedTasks(Protocol):
    """The tasks the relay has recorded, as far as this process knows (a read-only view
    of the ledger view's `KnownTasks`)."""

    def recorded_for_another(self, task_id: str, batch_id: str) -> bool:
        """Whether `task_id` is known to the relay, and not as `batch_id`'s task."""


class _NothingRecorded:
    def recorded_for_another(self, task_id: str, batch_id: str) -> bool:
        return False


def api_reference(batch: Batch) -> str:
    """The reference a batch is sent with: its events' own, or one unique to the batch."""
    return batch.reference or f"{REFERENCE_PREFIX}{batch.batch_id}"


def same_change(details: Mapping[str, Any] | None, request: UploadRequest) -> bool:
    """Whether a task's details are exactly the request's constraints and scm_data (the
    API may show a single value as a string)."""
    if not details:
        return False
    constraints, scm_data = details.get("constraints"), details.get("scm_data")
    if not isinstance(constraints, dict) or not isinstance(scm_data, dict):
        return False
    shown = {
        key: sorted([values] if isinstance(values, str) else [str(v) for v in values or []])
        for key, values in constraints.items()
    }
    sent = {key: sorted(values) for key, values in request.constraints.items()}
    return shown == sent and {k: str(v) for k, v in scm_data.items()} == request.scm_data


class Reconciler:
    """Finds the tasks an ambiguous upload of a batch created."""

    def __init__(self, api: TaskLookup, recorded: RecordedTasks | None = None) -> None:
        self._api = api
        self._recorded = recorded if recorded is not None else _NothingRecorded()

    async def find(
        self, batch: Batch, request: UploadRequest, first_sent: datetime, *, sends: int = 1
    ) -> list[str] | Failure:
        """Ids of the tasks this batch's uploads created (oldest first), or the failure
        that kept the lookup from answering (then nothing may be resent yet).

        `sends`: how many requests of the batch may have created a task. Under a shared
        reference two batches can carry the same change (a repeated event): each send
        created one task, so a batch adopts at most `sends` of the matching ones and
        leaves the others to the batch that sent them."""
        reference = api_reference(batch)
        page = await self._api.list_tasks(reference=reference)
        if not isinstance(page, TaskPage):
            return page
        listed = _each_once(sorted(page.tasks, key=_created))
        if not batch.reference:
            # The reference is this batch's alone: every task carrying it is the batch's.
            return [task.id for task in listed]
        since = first_sent - ASSUMED_CLOCK_SKEW
        found: list[str] = []
        for candidate in listed:
            if candidate.created_at is not None and candidate.created_at < since:
                continue
            if self._recorded.recorded_for_another(candidate.id, batch.batch_id):
                continue  # another batch's task: the same reference, maybe the same change
            task = await self._api.task(candidate.id)
            if not isinstance(task, ApiTask):
                return task
            if same_change(task.details, request):
                found.append(task.id)
        # Asked again at the end: another batch may have recorded one of them meanwhile.
        ours = [t for t in found if not self._recorded.recorded_for_another(t, batch.batch_id)]
        if len(ours) > sends:
            log.info(
                "reconcile_left_matching_tasks",
                batch_id=batch.batch_id,
                reference=reference,
                sends=sends,
                task_ids=ours[sends:][:5],
                hint="the same change under the same reference, sent by another batch",
            )
            ours = ours[:sends]
        skipped = [
            t.id
            for t in listed
            if (t.created_at is None or t.created_at >= since)
            and self._recorded.recorded_for_another(t.id, batch.batch_id)
        ]
        if skipped:
            log.info(
                "reconcile_skipped_recorded_tasks",
                batch_id=batch.batch_id,
                reference=reference,
                tasks=len(skipped),
                task_ids=skipped[:5],
            )
        return ours


def _each_once(tasks: list[ApiTask]) -> list[ApiTask]:
    """Each task id once: pages read while tasks are created shift, so one task may be
    listed on two of them."""
    once: dict[str, ApiTask] = {}
    for task in tasks:
        once.setdefault(task.id, task)
    return list(once.values())


def _created(task: ApiTask) -> datetime:
    return task.created_at or datetime.max.replace(tzinfo=UTC)
