"""The simulated Scantrust account: codes, campaigns, tasks, throttles and faults.

No HTTP here: `devkit.simulator.app` translates requests into these calls.
Where the vendor documents a behaviour the simulator follows it, with the
vendor's wording; where the documentation is silent it takes the strict choice
and docs/scantrust-api.md says so.
"""

from __future__ import annotations

import random
import unicodedata
import uuid
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

from pydantic import BaseModel, ConfigDict, Field

from devkit.simulator.seed import Seed
from devkit.simulator.throttling import RateThrottle, check_throttles

MAX_CONSTRAINT_KEYS: Final = 5
MAX_CONSTRAINT_VALUES: Final = 1000
IDENTIFIER_FIELDS: Final = ("extended_id", "serial_number")
SPECIAL_SCM_KEYS: Final = ("product", "activation_status", "blacklist_reason")


def now_iso() -> str:
    """The current time as the API writes it."""
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


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
class Code:
    """One code of the account and what was written to it."""

    extended_id: str
    serial_number: str | None
    campaign: int
    product: str | None
    scm_data: dict[str, str]
    activation_status: str = "1"
    blacklist_reason: str = "0"
    history: list[dict[str, Any]] = field(default_factory=list)

    def view(self) -> dict[str, Any]:
        """The inspection view of `/_sim/codes`."""
        return {
            "extended_id": self.extended_id,
            "serial_number": self.serial_number,
            "campaign": self.campaign,
            "product": self.product,
            "activation_status": self.activation_status,
            "blacklist_reason": self.blacklist_reason,
            "scm_data": dict(self.scm_data),
            "history": list(self.history),
        }


@dataclass
class Task:
    """A server task and the request it carries."""

    id: str
    reference: str
    constraints: dict[str, list[str]]
    scm_data: dict[str, str]
    campaign: int | None
    created_at: str
    state: str = "pending"
    started_at: str | None = None
    completed_at: str | None = None
    codes_affected: int | None = None
    error: str | None = None

    def view(self, *, details: bool) -> dict[str, Any]:
        """The task as the API shows it (with `details` in the single-task view)."""
        body: dict[str, Any] = {
            "id": self.id,
            "state": self.state,
            "reference": self.reference,
            "codes_affected": self.codes_affected,
            "created_by": SIMULATED_USER_ID,
            "created_at": self.created_at,
            "started_at": self.started_at,
            "completed_at": self.completed_at,
        }
        if self.error is not None:
            body["error"] = self.error
        if details:
            # The vendor's example shows one value as a string ("rfid": "test_rfid");
            # several are shown as a list (an assumption: the vendor shows no such task).
            shown = {
                key: values[0] if len(values) == 1 else list(values)
                for key, values in self.constraints.items()
            }
            body["details"] = {"constraints": shown, "scm_data": dict(self.scm_data)}
        return body


SIMULATED_USER_ID: Final = 1638


class UploadInvalid(Exception):
    """A 400: `errors` is the body, by field, in the vendor's shape."""

    def __init__(self, errors: dict[str, Any]) -> None:
        super().__init__(str(errors))
        self.errors = errors


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
        self.campaign_fields = {c.id: frozenset(c.scm_fields) for c in seed.campaigns}
        self.codes: list[Code] = []
        # field -> value -> indexes of codes holding it; identifiers and SCM fields alike.
        self._index: dict[str, dict[str, set[int]]] = {}
        for seeded in seed.codes:
            self._add_code(
                Code(
                    extended_id=seeded.extended_id,
                    serial_number=seeded.serial_number,
                    campaign=seeded.campaign,
                    product=seeded.product,
                    scm_data=dict(seeded.scm_data),
                )
            )
        self.tasks: dict[str, Task] = {}
        self._task_order: deque[str] = deque()
        self._apply_sequence = 0
        # (scope, token) -> arrival times of the allowed requests, newest first (DRF's cache).
        self._throttle_histories: dict[tuple[str, str], deque[float]] = {}
        self.throttle_storm_until = 0.0
        # Tests' crash points: called with "received" before an upload creates its task
        # and "created" after, before the answer is written (an in-process simulator only).
        self.upload_hook: Callable[[str], Awaitable[None]] | None = None

    # -- codes ---------------------------------------------------------------

    def _add_code(self, code: Code) -> None:
        position = len(self.codes)
        self.codes.append(code)
        self._index_value("extended_id", code.extended_id, position)
        if code.serial_number is not None:
            self._index_value("serial_number", code.serial_number, position)
        for key, value in code.scm_data.items():
            self._index_value(key, value, position)

    def _index_value(self, key: str, value: str, position: int) -> None:
        self._index.setdefault(key, {}).setdefault(value, set()).add(position)

    def _unindex_value(self, key: str, value: str, position: int) -> None:
        self._index.get(key, {}).get(value, set()).discard(position)

    def find_code(self, key: str, value: str) -> Code | None:
        """The first code whose `key` is `value` (inspection)."""
        positions = self._index.get(key, {}).get(value)
        return self.codes[min(positions)] if positions else None

    def matching(self, constraints: dict[str, list[str]]) -> set[int]:
        """Codes matched by any constraint value (several keys combine as a union)."""
        matched: set[int] = set()
        for key, values in constraints.items():
            by_value = self._index.get(key, {})
            for value in values:
                matched |= by_value.get(value, set())
        return matched

    # -- uploads ---------------------------------------------------------------

    def validate_upload(self, body: Any) -> Task:
        """Check an upload body as the API does; a new pending task, or `UploadInvalid`."""
        if not isinstance(body, dict):
            kind = type(body).__name__
            raise UploadInvalid(
                {"non_field_errors": [f"Invalid data. Expected a dictionary, but got {kind}."]}
            )
        errors: dict[str, Any] = {}
        campaign = self._check_campaign(body.get("campaign"), errors)
        constraints = self._check_constraints(body.get("constraints"), campaign, errors)
        scm_data = self._check_scm_data(body.get("scm_data"), campaign, errors)
        reference = body.get("reference", "")
        if reference is None:
            reference = ""
        if not isinstance(reference, str):
            errors["reference"] = ["Not a valid string."]
        elif (problem := _not_text_problem(reference)) is not None:
            errors["reference"] = [problem]
        if errors:
            raise UploadInvalid(errors)
        if constraints is None or scm_data is None:  # pragma: no cover - errors said so
            raise UploadInvalid({"non_field_errors": ["Invalid data."]})
        return Task(
            id=str(uuid.uuid4()),
            reference=reference,
            constraints=constraints,
            scm_data=scm_data,
            campaign=campaign,
            created_at=now_iso(),
        )

    def _check_campaign(self, campaign: Any, errors: dict[str, Any]) -> int | None:
        if campaign is None:
            return None
        if not isinstance(campaign, int) or isinstance(campaign, bool):
            kind = "str" if isinstance(campaign, str) else type(campaign).__name__
            errors["campaign"] = [f"Incorrect type. Expected pk value, received {kind}."]
            return None
        if campaign not in self.campaign_fields:
            errors["campaign"] = [f'Invalid pk "{campaign}" - object does not exist.']
            return None
        return campaign

    def _check_constraints(
        self, constraints: Any, campaign: int | None, errors: dict[str, Any]
    ) -> dict[str, list[str]] | None:
        problem = _object_problem(constraints, "At least one constraint is required.")
        if problem is not None:
            errors["constraints"] = [problem]
            return None
        if len(constraints) > MAX_CONSTRAINT_KEYS:
            errors["constraints"] = [f"At most {MAX_CONSTRAINT_KEYS} constraints are allowed."]
            return None
        by_key: dict[str, str] = {}
        normalised: dict[str, list[str]] = {}
        total = 0
        for key, raw in constraints.items():
            problem = _not_text_problem(key) or self._constraint_key_problem(key, campaign)
            values = raw if isinstance(raw, list) else [raw]
            total += len(values)
            if problem is None:
                problem = _values_problem(values)
            if problem is not None:
                by_key[key] = problem
            else:
                normalised[key] = list(values)
        if total > MAX_CONSTRAINT_VALUES:
            errors["constraints"] = [f"At most {MAX_CONSTRAINT_VALUES} values are allowed."]
            return None
        if by_key:
            errors["constraints"] = by_key
            return None
        return normalised

    def _constraint_key_problem(self, key: str, campaign: int | None) -> str | None:
        if key == "message":
            return "Invalid constraint name, please use 'extended_id' instead"
        if key in ("product", "product_id", "campaign", "campaign_id"):
            return "Invalid constraint name"
        if (
            campaign is not None
            and key not in IDENTIFIER_FIELDS
            and key not in self.campaign_fields[campaign]
        ):
            return f"Invalid constraint name, '{key}' is not a field of campaign {campaign}"
        return None

    def _check_scm_data(
        self, scm_data: Any, campaign: int | None, errors: dict[str, Any]
    ) -> dict[str, str] | None:
        problem = _object_problem(scm_data, "At least one field is required.")
        if problem is not None:
            errors["scm_data"] = [problem]
            return None
        by_key: dict[str, str] = {}
        for key, value in scm_data.items():
            problem = _not_text_problem(key) or _scm_key_problem(key)
            if (
                problem is None
                and campaign is not None
                and key not in SPECIAL_SCM_KEYS
                and key not in self.campaign_fields[campaign]
            ):
                # The vendor: with `campaign` given, "the server checks that
                # client_custom_field is a field of campaign 11" (the wording is ours).
                problem = f"Invalid key name, '{key}' is not a field of campaign {campaign}"
            if problem is None and not isinstance(value, str):
                problem = "Values must be strings."
            if problem is None:
                problem = _not_text_problem(value)
            if problem is None and key == "activation_status" and value not in ("0", "1", "2"):
                problem = "Invalid value, use 0 (inactive), 1 (active) or 2 (blacklisted)"
            if problem is None and key == "blacklist_reason" and value not in _BLACKLIST:
                problem = "Invalid value, use 0 to 10"
            if problem is not None:
                by_key[key] = problem
        if by_key:
            errors["scm_data"] = by_key
            return None
        return dict(scm_data)

    def register(self, task: Task, values: int) -> None:
        """Keep an accepted task (dropping the oldest finished ones past the cap)."""
        self.tasks[task.id] = task
        self._task_order.append(task.id)
        self.stats.uploads_accepted += 1
        self.stats.upload_values_total += values
        self.stats.upload_values_max = max(self.stats.upload_values_max, values)
        while len(self._task_order) > MAX_TASKS_KEPT:
            oldest = self._task_order.popleft()
            if self.tasks[oldest].state in ("complete", "failed"):
                del self.tasks[oldest]
            else:
                self._task_order.append(oldest)
                break

    # -- task processing -------------------------------------------------------

    def start(self, task: Task) -> None:
        """pending -> in-progress."""
        task.state = "in-progress"
        task.started_at = now_iso()

    def finish(self, task: Task) -> None:
        """Apply the task's changes to the matched codes, or fail it (fault knob)."""
        scripted = self.faults.fail_reference is not None and (
            task.reference == self.faults.fail_reference
        )
        if scripted or self.rng.random() < self.faults.fail_rate:
            task.state = "failed"
            task.codes_affected = 0
            task.error = "Simulated failure (fail_rate)"
            task.completed_at = now_iso()
            return
        affected = 0
        self._apply_sequence += 1
        for position in sorted(self.matching(task.constraints)):
            if self._apply(position, task):
                affected += 1
        self.stats.updates_applied += affected
        task.codes_affected = affected
        task.state = "complete"
        task.completed_at = now_iso()

    def _apply(self, position: int, task: Task) -> bool:
        code = self.codes[position]
        allowed = self.campaign_fields[code.campaign]
        changes: dict[str, str] = {}
        for key, value in task.scm_data.items():
            if key == "product":
                code.product = value
            elif key == "activation_status":
                code.activation_status = value
            elif key == "blacklist_reason":
                code.blacklist_reason = value
            elif key in allowed:
                old = code.scm_data.get(key)
                if old is not None:
                    self._unindex_value(key, old, position)
                code.scm_data[key] = value
                self._index_value(key, value, position)
            else:
                continue  # not a field of the code's campaign: discarded, as the vendor does
            changes[key] = value
        if not changes:
            return False
        code.history.append(
            {"task_id": task.id, "sequence": self._apply_sequence, "at": now_iso(), "set": changes}
        )
        return True

    # -- throttling --------------------------------------------------------------

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
        # The user scope counts every authenticated request, the scm_update scope uploads.
        throttles = [self._throttle(USER_SCOPE, token, self.faults.overall_rate_per_min, 60.0)]
        if is_upload:
            throttles.append(
                self._throttle(UPLOAD_SCOPE, token, self.faults.upload_rate_per_s, 1.0)
            )
        return check_throttles(throttles, now)

    def counted_arrivals(self, scope: str, token: str) -> list[float]:
        """When the requests a throttle scope counts for `token` arrived, oldest first
        (inspection: only those still in its window)."""
        return list(reversed(self._throttle_histories.get((scope, token), ())))

    def _throttle(self, scope: str, token: str, num_requests: int, duration: float) -> RateThrottle:
        # Built per request with the rate of the moment over a history that stays, as DRF
        # does: a rate changed at run time applies to the history already there.
        history = self._throttle_histories.setdefault((scope, token), deque())
        return RateThrottle(num_requests, duration, history)


USER_SCOPE: Final = "user"
UPLOAD_SCOPE: Final = "scm_update"
MAX_TASKS_KEPT: Final = 200_000
_BLACKLIST: Final = frozenset(str(n) for n in range(11))


def _object_problem(value: Any, when_empty: str) -> str | None:
    """What is wrong with a required JSON-object field, in the framework's words."""
    if value is None:
        return "This field is required."
    if not isinstance(value, dict):
        return f'Expected a dictionary of items but got type "{type(value).__name__}".'
    if not value:
        return when_empty
    return None


def _values_problem(values: list[Any]) -> str | None:
    if not values:
        return "At least one value is required."
    if not all(isinstance(value, str) for value in values):
        return "Values must be strings."
    for value in values:
        if (problem := _not_text_problem(value)) is not None:
            return problem
    if any(not value.strip() for value in values):
        return "Blank values are not allowed."
    if len(set(values)) != len(values):
        return "Duplicate values are not allowed."
    return None


# Control (Cc: NUL, ESC, line breaks), format (Cf: zero-width space, bidi overrides) and
# lone surrogates (Cs): the vendor says nothing of them, so the simulator refuses them.
_NOT_TEXT: Final = frozenset({"Cc", "Cf", "Cs"})


def _not_text_problem(text: str) -> str | None:
    """Why `text` holds a character that is not text (the first one), or None."""
    if text.isprintable():  # then none of them (the common case, checked in C)
        return None
    # isprintable() also refuses what is text here (no-break space, Zl, Zp, Co, Cn).
    for position, char in enumerate(text):
        if unicodedata.category(char) in _NOT_TEXT:
            return (
                f"Control and format characters are not allowed: U+{ord(char):04X} "
                f"({unicodedata.category(char)}) at position {position}."
            )
    return None


def _scm_key_problem(key: str) -> str | None:
    if key in ("extended_id", "serial_number", "message"):
        return "Invalid key name"
    if key == "product_id":
        return "Invalid key name, use 'product' instead"
    if key == "status":
        return "Invalid key name, use 'activation_status' instead"
    return None
