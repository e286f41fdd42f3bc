"""What an API call came to, as types the pipeline acts on without reading HTTP.

Each response class of docs/scantrust-api.md maps to one type here. The client
classifies once, where the response enters; everything after matches on type.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from random import Random
from typing import Annotated, Any, Final

from pydantic import BaseModel, ConfigDict, Field

from service.core.resilience import Backoff


class TaskApiState(StrEnum):
    """States of a Scantrust SCM task."""

    PENDING = "pending"
    IN_PROGRESS = "in-progress"
    COMPLETE = "complete"
    FAILED = "failed"

    @property
    def finished(self) -> bool:
        """Complete or failed: the task will not change again."""
        return self in (TaskApiState.COMPLETE, TaskApiState.FAILED)


class ApiTask(BaseModel):
    """A task as the API reports it (single view, list view and bulk view)."""

    # The vendor may add fields; unknown ones are kept, never an error.
    model_config = ConfigDict(extra="allow", frozen=True)

    id: str
    # A state the documentation does not name is kept as it is, never an error: one
    # unknown task must not cost the results of the others in its page.
    state: Annotated[TaskApiState | str, Field(union_mode="left_to_right")]
    reference: str | None = ""
    codes_affected: int | None = None
    created_by: int | None = None
    created_at: datetime | None = None
    started_at: datetime | None = None
    completed_at: datetime | None = None
    details: dict[str, Any] | None = None

    @property
    def finished(self) -> bool:
        """Complete or failed: the task will not change again (an unknown state is not)."""
        return self.state in (TaskApiState.COMPLETE, TaskApiState.FAILED)

    @property
    def finished_well(self) -> bool:
        """Complete (a failed or unfinished task is not)."""
        return self.state is TaskApiState.COMPLETE

    @property
    def known_state(self) -> bool:
        """Whether the state is one the API documents."""
        return isinstance(self.state, TaskApiState)


class ApiTaskGroup(BaseModel):
    """`GET /api/v2/scm/task-groups/{reference}/`."""

    model_config = ConfigDict(extra="allow", frozen=True)

    reference: str
    tasks_count: int
    codes_affected: int | None = None
    completed: bool
    state_stats: dict[str, int] = {}
    started_at: datetime | None = None
    completed_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class Accepted:
    """200 to an upload: the server created task `task_id`."""

    task_id: str


@dataclass(frozen=True, slots=True)
class Rejected:
    """A 400 whose body names what is wrong with the data (or a 404 for a task id the API
    does not know): resending the same request fails again.

    `errors` is the parsed error body by field, or `{"detail": body}` when the body is
    not a JSON object.
    """

    status: int
    errors: dict[str, Any]
    body: str


@dataclass(frozen=True, slots=True)
class AuthFailed:
    """401 or 403: the token is missing, wrong or lacks a permission. Never retried."""

    status: int
    body: str


@dataclass(frozen=True, slots=True)
class Misconfigured:
    """Any other 4xx (404 and 405 from a wrong base URL or path, a 400 that names no
    field, 409, 413...): the relay's configuration is wrong, not the data. Nothing is
    dead-lettered; intake stops until a later call is accepted."""

    status: int
    body: str


@dataclass(frozen=True, slots=True)
class Throttled:
    """429: wait `retry_after_s` before the next request."""

    retry_after_s: float
    body: str


@dataclass(frozen=True, slots=True)
class Unavailable:
    """The request did not reach a working API: 5xx, refused, DNS, connect timeout,
    or the circuit breaker is open. Safe to retry."""

    reason: str
    status: int | None = None
    retry_after_s: float | None = None


@dataclass(frozen=True, slots=True)
class PagesExceeded(Unavailable):
    """A list call followed `pages` pages without reaching the last (the client's bound):
    the list is longer than the relay reads, and asking again will not shorten it."""

    pages: int = 0


@dataclass(frozen=True, slots=True)
class Ambiguous:
    """An upload was sent and its fate is unknown (no answer before the timeout, a reset,
    a 5xx answer, a 2xx without a task id): the task may exist. Never resent blindly:
    the uploaders look for it by reference first (docs/design.md, section 10)."""

    reason: str
    status: int | None = None


@dataclass(frozen=True, slots=True)
class Expired:
    """An upload was not sent: the intent it was committed under allows sending only
    within its send window, which passed while it waited (rate limit, a pause), by the
    wall clock (`send_by`) or the event loop's monotonic clock; or the two clocks
    disagreed about the time left by `clock_jump_s` (positive: the wall clock is behind),
    more than the client accepts. Nothing reached the API; the uploader commits a fresh
    intent before it tries again."""

    send_by: float
    clock_jump_s: float | None = None


Failure = Rejected | AuthFailed | Misconfigured | Throttled | Unavailable | Ambiguous
# The API refused the relay itself (its token, its base URL): stop, probe, resume.
Refused = AuthFailed | Misconfigured
UploadOutcome = Accepted | Failure
RETRYABLE: Final = (Throttled, Unavailable, Ambiguous)


@dataclass(frozen=True, slots=True)
class TaskPage:
    """The tasks a status or list call returned."""

    tasks: list[ApiTask] = field(default_factory=list)


_THROTTLE_SECONDS_RE: Final = re.compile(r"available in (\d+(?:\.\d+)?) second", re.IGNORECASE)
DEFAULT_THROTTLE_WAIT_S: Final = 1.0


def throttle_wait(retry_after: str | None, body: str) -> float:
    """Seconds to wait after a 429: `Retry-After` when given (seconds), else the number in
    the documented `detail` text, else one second."""
    if retry_after is not None:
        try:
            return max(0.0, float(retry_after.strip()))
        except ValueError:
            pass  # an HTTP-date or junk: fall back to the body, as the vendor documents it
    match = _THROTTLE_SECONDS_RE.search(body)
    if match:
        return float(match.group(1))
    return DEFAULT_THROTTLE_WAIT_S


def retry_wait(
    outcome: Throttled | Unavailable | Ambiguous, attempt: int, backoff: Backoff, rng: Random
) -> float:
    """How long to wait before attempt `attempt + 1`: a 429's wait as the API names it,
    else exponential backoff with full jitter, never shorter than a `Retry-After`."""
    if isinstance(outcome, Throttled):
        return outcome.retry_after_s
    delay = backoff.delay(attempt, rng)
    if isinstance(outcome, Unavailable) and outcome.retry_after_s is not None:
        return max(delay, outcome.retry_after_s)
    return delay
