"""The simulated Scantrust account: its faults and counters, and the account that
composes the code store (codes.py), the vendor's validation of uploads (validation.py),
the tasks' lifecycle (tasks.py) and the throttles (throttling.py).

No HTTP here: `devkit.simulator.app` translates requests into these calls.
Where the vendor documents a behaviour the simulator follows it, with the
vendor's wording; where the documentation is silent it takes the strict choice
and docs/scantrust-api.md says so.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Final

from pydantic import BaseModel, ConfigDict, Field

from devkit.simulator.codes import Code, CodeStore
from devkit.simulator.seed import Seed
from devkit.simulator.tasks import Task, TaskBook
from devkit.simulator.throttling import ThrottleHistories, check_throttles
from devkit.simulator.validation import UploadRules

# The throttle scopes of the vendor's API: the user scope counts every authenticated
# request, the scm_update scope uploads.
USER_SCOPE: Final = "user"
UPLOAD_SCOPE: Final = "scm_update"


class Faults(BaseModel):
    """Fault knobs, settable at start and at run time (`POST /_sim/faults`)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    latency_s: float = Field(default=0.0, ge=0, le=600, description="added to every API request")
    one_way_delay_s: float = Field(
        default=0.0,
        ge=0,
        le=60,
        description="each API request arrives after a random delay up to this (throttled then)",
    )
    error_rate: float = Field(default=0.0, ge=0, le=1, description="share of 503 answers")
    throttle_storm_s: float = Field(
        default=0.0, ge=0, le=3600, description="answer 429 to every request for this long"
    )
    retry_after_header: bool = Field(default=False, description="send Retry-After with 429")
    fail_rate: float = Field(default=0.0, ge=0, le=1, description="share of tasks that fail")
    never_finish_rate: float = Field(
        default=0.0, ge=0, le=1, description="share of tasks stuck in-progress forever"
    )
    drop_response_rate: float = Field(
        default=0.0, ge=0, le=1, description="share of uploads processed whose answer is dropped"
    )
    error_after_create_rate: float = Field(
        default=0.0,
        ge=0,
        le=1,
        description="share of uploads processed (the task exists) that answer 502 anyway",
    )
    hang_after_create_rate: float = Field(
        default=0.0,
        ge=0,
        le=1,
        description="share of uploads processed (the task exists) whose answer hangs",
    )
    hang_s: float = Field(default=30.0, ge=0, le=600, description="how long a hanging answer hangs")
    fail_reference: str | None = Field(
        default=None, description="tasks with this reference always fail"
    )
    forbidden: bool = Field(default=False, description="answer 403 to every API request")
    token_revoked: bool = Field(
        default=False, description="answer 401 to every API request (the token was revoked)"
    )
    pending_delay_s: float = Field(default=0.05, ge=0, le=3600, description="time pending")
    progress_delay_s: float = Field(default=0.1, ge=0, le=3600, description="time in-progress")
    jitter_s: float = Field(
        default=0.1, ge=0, le=3600, description="random extra processing time per task"
    )
    upload_rate_per_s: int = Field(default=10, ge=1, description="scm_update throttle")
    overall_rate_per_min: int = Field(default=3000, ge=1, description="user throttle")
    page_size: int = Field(default=100, ge=1, le=10_000, description="list and bulk page size")


@dataclass
class Stats:
    """Counters tests and benchmarks read through `GET /_sim/stats`."""

    requests: Counter[str] = field(default_factory=Counter)
    statuses: Counter[str] = field(default_factory=Counter)
    uploads_accepted: int = 0
    upload_values_total: int = 0
    upload_values_max: int = 0
    throttled: int = 0
    responses_dropped: int = 0
    errors_after_create: int = 0
    answers_hung: int = 0
    updates_applied: int = 0

    def view(self) -> dict[str, Any]:
        """JSON view."""
        return {
            "requests": dict(self.requests),
            "statuses": dict(self.statuses),
            "uploads_accepted": self.uploads_accepted,
            "upload_values_total": self.upload_values_total,
            "upload_values_max": self.upload_values_max,
            "throttled": self.throttled,
            "responses_dropped": self.responses_dropped,
            "errors_after_create": self.errors_after_create,
            "answers_hung": self.answers_hung,
            "updates_applied": self.updates_applied,
        }


class Account:
    """The simulated company account: its codes, campaigns, tasks and throttles."""

    def __init__(self, seed: Seed, faults: Faults | None = None, *, rng_seed: int = 0) -> None:
        self.faults = faults or Faults()
        self.rng = random.Random(rng_seed)  # noqa: S311 - simulation, not cryptography
        self.stats = Stats()
        self.store = CodeStore(seed)
        self.rules = UploadRules(self.store.campaign_fields)
        self.book = TaskBook()
        self.throttle_histories = ThrottleHistories()
        self.throttle_storm_until = 0.0
        # Tests' crash points: called with "received" before an upload creates its task
        # and "created" after, before the answer is written (an in-process simulator only).
        self.upload_hook: Callable[[str], Awaitable[None]] | None = None

    @property
    def codes(self) -> list[Code]:
        """The account's codes, in seed order."""
        return self.store.codes

    @property
    def campaign_fields(self) -> dict[int, frozenset[str]]:
        """The SCM field keys of each campaign."""
        return self.store.campaign_fields

    @property
    def tasks(self) -> dict[str, Task]:
        """The tasks kept, by id."""
        return self.book.tasks

    def find_code(self, key: str, value: str) -> Code | None:
        """The first code whose `key` is `value` (inspection)."""
        return self.store.find_code(key, value)

    # -- uploads and tasks -----------------------------------------------------

    def validate_upload(self, body: Any) -> Task:
        """Check an upload body as the API does; a new pending task, or `UploadInvalid`."""
        return self.rules.validate(body)

    def register(self, task: Task, values: int) -> None:
        """Keep an accepted task (dropping the oldest finished ones past the cap)."""
        self.stats.uploads_accepted += 1
        self.stats.upload_values_total += values
        self.stats.upload_values_max = max(self.stats.upload_values_max, values)
        self.book.keep(task)

    def start(self, task: Task) -> None:
        """pending -> in-progress."""
        task.start()

    def finish(self, task: Task) -> None:
        """Apply the task's changes to the matched codes, or fail it (fault knob)."""
        scripted = self.faults.fail_reference is not None and (
            task.reference == self.faults.fail_reference
        )
        if scripted or self.rng.random() < self.faults.fail_rate:
            task.fail("Simulated failure (fail_rate)")
            return
        affected = self.store.apply(task.id, task.constraints, task.scm_data)
        self.stats.updates_applied += affected
        task.complete(affected)

    # -- the network and the throttles ------------------------------------------

    def one_way_delay(self) -> float:
        """How long the next API request travels before it arrives (the
        `one_way_delay_s` knob; no draw from the dice when it is 0)."""
        if not self.faults.one_way_delay_s:
            return 0.0
        return self.rng.uniform(0.0, self.faults.one_way_delay_s)

    def throttle_wait(self, token: str, *, is_upload: bool, now: float) -> float | None:
        """0.0 when a request arriving at `now` passes every throttle (and is counted by
        each); else the wait the 429 names, in seconds (None: DRF names none)."""
        if now < self.throttle_storm_until:
            return self.throttle_storm_until - now
        histories = self.throttle_histories
        throttles = [histories.throttle(USER_SCOPE, token, self.faults.overall_rate_per_min, 60.0)]
        if is_upload:
            throttles.append(
                histories.throttle(UPLOAD_SCOPE, token, self.faults.upload_rate_per_s, 1.0)
            )
        return check_throttles(throttles, now)

    def counted_arrivals(self, scope: str, token: str) -> list[float]:
        """When the requests a throttle scope counts for `token` arrived, oldest first
        (inspection: only those still in its window)."""
        return self.throttle_histories.arrivals(scope, token)
