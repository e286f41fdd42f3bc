"""Reconciliation: after an ambiguous upload, find the task it may have created.

An upload whose fate is unknown (no answer before the timeout, a reset, a 5xx,
a 2xx without a task id) is never resent blindly. Once the original request
can no longer create a task (the request timeout has passed since its answer
or its timeout), the uploader asks the API for the tasks carrying the batch's
reference (`GET /api/v2/scm/tasks/?reference=…`, every page):

- a batch without a reference of its own is sent with a unique one,
  `scm-relay:<batch id>`, so every task found is this batch's;
- a batch carrying its events' reference shares it with other tasks: the
  candidates created since the batch was first sent are read one by one
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
# Tasks created this long before the batch was first sent still count as candidates:
# the API's clock and ours may disagree by this much.
CLOCK_SKEW: Final = timedelta(minutes=5)


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

    def __init__(self, api: TaskLookup) -> None:
        self._api = api

    async def find(
        self, batch: Batch, request: UploadRequest, first_sent: datetime
    ) -> list[str] | Failure:
        """Ids of the tasks this batch's uploads created (oldest first), or the failure
        that kept the lookup from answering (then nothing may be resent yet)."""
        reference = api_reference(batch)
        page = await self._api.list_tasks(reference=reference)
        if not isinstance(page, TaskPage):
            return page
        if not batch.reference:
            # The reference is this batch's alone: every task carrying it is the batch's.
            return [task.id for task in sorted(page.tasks, key=_created)]
        found: list[str] = []
        for candidate in sorted(page.tasks, key=_created):
            if candidate.created_at is not None and candidate.created_at < first_sent - CLOCK_SKEW:
                continue
            task = await self._api.task(candidate.id)
            if not isinstance(task, ApiTask):
                return task
            if same_change(task.details, request):
                found.append(task.id)
        return found


def _created(task: ApiTask) -> datetime:
    return task.created_at or datetime.max.replace(tzinfo=UTC)
