"""The Scantrust SCM API client: the relay's only door to Scantrust (aiohttp).

One `ClientSession` per process. Every attempt goes through one path
(`_attempt`): circuit breaker, rate limiters, then the HTTP exchange with
timeouts and a bounded body, classified into a typed outcome (`HttpExchange`,
exchange.py). Reads are retried by the client (`ReadRetries`, read_retries.py)
with exponential backoff and full jitter that honour throttling waits; an upload
is attempted once and its caller, the uploaders, owns its retries. Callers get a
value or a typed `Failure`; they never see aiohttp exceptions.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any, Final, Self, TypeVar
from urllib.parse import quote, urlencode, urljoin, urlsplit, urlunsplit

import structlog
from pydantic import BaseModel, ConfigDict, ValidationError

from service.core.resilience import Backoff, BreakerState
from service.core.slots import Slot
from service.scantrust.breaker import ReportedBreaker
from service.scantrust.exchange import ApiCall, ApiResponse, HttpExchange, json_object
from service.scantrust.limits import RateLimits
from service.scantrust.observer import ApiObserver, NullObserver
from service.scantrust.outcomes import (
    Accepted,
    Ambiguous,
    ApiTask,
    ApiTaskGroup,
    Expired,
    Failure,
    Misconfigured,
    PagesExceeded,
    Rejected,
    TaskPage,
    UploadOutcome,
)
from service.scantrust.read_retries import ReadRetries
from service.settings import ApiSettings

log = structlog.get_logger(__name__)
_Model = TypeVar("_Model", bound=BaseModel)

UPLOAD_PATH: Final = "/api/v2/scm/upload/async/"
TASKS_PATH: Final = "/api/v2/scm/tasks/"
TASK_GROUPS_PATH: Final = "/api/v2/scm/task-groups/"
ME_PATH: Final = "/api/v2/me/"
MAX_TASK_PAGES: Final = 10_000
# An upload's wall-clock `send_by` and monotonic `deadline` are set from one moment: when
# the time left by each differs by more than this, the wall clock jumped (an NTP step, a
# VM suspended or migrated) and the intent's `send_by`, which other processes read on
# their wall clocks, no longer says when this process may send.
CLOCK_JUMP_S: Final = 1.0


class UploadRequest(BaseModel):
    """The body of `POST /api/v2/scm/upload/async/`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    constraints: dict[str, list[str]]
    scm_data: dict[str, str]
    campaign: int | None = None
    reference: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The JSON body: absent optional fields are left out, not sent as null."""
        return self.model_dump(exclude_none=True)


class _SendByPassed(Exception):
    """An upload's send window closed before it was sent (see `ScantrustClient.upload`)."""

    def __init__(self, expired: Expired) -> None:
        super().__init__(expired)
        self.expired = expired


def _refuse_if_closed(call: ApiCall, wall: float) -> None:
    """Raise `_SendByPassed` when `call`'s send window has closed at `wall` (and now on
    the event loop's clock)."""
    closed = send_window_closed(
        call.send_by, call.deadline, wall, asyncio.get_running_loop().time()
    )
    if closed is not None:
        raise _SendByPassed(closed)


def send_window_closed(
    send_by: float | None, deadline: float | None, wall: float, monotonic: float
) -> Expired | None:
    """Why an upload may not be sent now under an intent allowing it until `send_by` (Unix
    time, read on the wall clock `wall`) and `deadline` (read on the event loop's
    monotonic clock `monotonic`), both set from the moment the intent was made; None when
    it may. A wall clock that disagrees with the monotonic one by more than
    `CLOCK_JUMP_S` about the time left is refused, whichever is ahead."""
    if send_by is not None and deadline is not None:
        jump = (send_by - wall) - (deadline - monotonic)
        if abs(jump) > CLOCK_JUMP_S:
            return Expired(send_by, clock_jump_s=jump)
    if (send_by is not None and wall >= send_by) or (
        deadline is not None and monotonic >= deadline
    ):
        return Expired(send_by if send_by is not None else 0.0)
    return None


class ScantrustClient:
    """Typed, rate-limited, retrying access to the Scantrust SCM API."""

    def __init__(
        self,
        config: ApiSettings,
        observer: ApiObserver | None = None,
        *,
        rng: random.Random | None = None,
        clock: Callable[[], float] | None = None,
        limits: RateLimits | None = None,
    ) -> None:
        self._config = config
        self._observer: ApiObserver = observer or NullObserver()
        self._clock = clock
        self._base = str(config.base_url).rstrip("/")
        self._limits = limits or RateLimits(
            config.upload_rate_per_s,
            config.rate_per_min,
            unanswered_hold_s=config.request_timeout_s,
        )
        self._breaker = ReportedBreaker(
            config.breaker_failures, config.breaker_cooldown_s, self._observer, now=self._now
        )
        self._http = HttpExchange(
            config, self._observer, ready=self._on_time, wall=self._limits.wall, now=self._now
        )
        self._reads = ReadRetries(
            self._attempt,
            Backoff(config.retry_initial_s, config.retry_max_backoff_s),
            rng or random.Random(),  # noqa: S311 - jitter, not cryptography
            self._observer,
            budget_s=config.retry_max_elapsed_s,
            now=self._now,
        )

    @property
    def limits(self) -> RateLimits:
        """This replica's share of the account's limits (the group's assignments set it)."""
        return self._limits

    # -- lifecycle ---------------------------------------------------------

    async def start(self) -> None:
        """Open the HTTP session (idempotent)."""
        await self._http.start()

    def reserve_upload_slot(self) -> Slot | None:
        """Take this replica's next upload slot now, for an upload about to be made (see
        `upload`); None when it owns no input partition yet."""
        return self._limits.reserve_upload()

    async def _on_time(self, call: ApiCall) -> None:
        """An upload's last check, once its connection is ready and before it is written
        (`HttpExchange` calls it): one late for its slot waits for the next one, and is
        not sent at all once its send window has closed meanwhile (the connection is then
        closed unused: nothing was written)."""
        slot = call.slot
        if slot is None:
            return
        loop = asyncio.get_running_loop()
        # Never past the send window, nor past half the request's own timeout (aiohttp's
        # total timeout runs meanwhile, and firing here would make a request that was
        # never written look ambiguous): a slot that has not come by then is Expired.
        budget = self._config.request_timeout_s / 2
        if call.deadline is not None:
            budget = min(budget, call.deadline - loop.time())
        try:
            async with asyncio.timeout(max(0.0, budget)):
                call.slot = await self._limits.on_time(slot)
        except TimeoutError:
            _refuse_if_closed(call, self._limits.wall())
            raise _SendByPassed(Expired(call.send_by or 0.0)) from None
        _refuse_if_closed(call, self._limits.wall())

    async def stop(self) -> None:
        """Close the HTTP session (idempotent)."""
        await self._http.stop()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.stop()

    def __repr__(self) -> str:
        return f"ScantrustClient(base_url={self._base!r})"

    async def reload_token(self) -> bool:
        """Read the token file again if it changed (a rotated Kubernetes Secret); True when
        the token changed."""
        return await self._http.reload_token()

    @property
    def breaker_state(self) -> BreakerState:
        """The circuit breaker's state, for readiness and metrics."""
        return self._breaker.state

    # -- calls -------------------------------------------------------------

    async def upload(
        self,
        request: UploadRequest,
        *,
        send_by: float | None = None,
        deadline: float | None = None,
        slot: Slot | None = None,
    ) -> UploadOutcome | Expired:
        """Submit one batch, once; `Accepted` carries the new task's id.

        One attempt (after the rate limiters and the circuit breaker): an upload is the
        one call with a side effect, so its retries belong to the caller, which alone
        knows whether a resend is safe (docs/design.md, "Retries"). The send window of
        the intent it goes under: `send_by` (a Unix time, on the wall clock) and
        `deadline` (the same moment on the event loop's monotonic clock, which no clock
        step moves). The request is not sent once either has passed, nor when the two
        clocks disagree about the time left (`send_window_closed`); `Expired` says so.
        Checked after the rate limiters, and again once the connection is ready, the last
        wait before the request is written. `slot`: one `reserve_upload_slot` took before
        the caller's own wait (the intent's transaction), used if it has not passed."""
        call = ApiCall(
            "upload",
            "POST",
            self._url(UPLOAD_PATH),
            request.to_json(),
            is_upload=True,
            send_by=send_by,
            deadline=deadline,
            slot=slot,
        )
        try:
            result = await self._attempt(call)
        except _SendByPassed as passed:
            return passed.expired
        if not isinstance(result, ApiResponse):
            return result
        task_id = json_object(result.body).get("task_id")
        if isinstance(task_id, str) and task_id:
            return Accepted(task_id)
        # Processed (200) yet no task id: the task may exist, so never resend blindly.
        self._observer.ambiguous("upload")
        return Ambiguous(f"upload answered {result.status} without a task_id")

    async def task(self, task_id: str) -> ApiTask | Failure:
        """`GET /api/v2/scm/tasks/{id}/`."""
        segment = _path_segment(task_id)
        if segment is None:
            return _unusable_segment(task_id, "task id")
        result = await self._reads.call(
            ApiCall("task", "GET", self._url(f"{TASKS_PATH}{segment}/"))
        )
        if not isinstance(result, ApiResponse):
            return result
        return _parse(ApiTask, json_object(result.body), "task")

    async def tasks(self, task_ids: Sequence[str]) -> TaskPage | Failure:
        """Many tasks by id with `POST /api/v2/scm/tasks/`, in chunks; ids the API does not
        return are simply absent from the page."""
        found: list[ApiTask] = []
        size = self._config.status_chunk_size
        for start in range(0, len(task_ids), size):
            chunk = list(task_ids[start : start + size])
            call = ApiCall("tasks_bulk", "POST", self._url(TASKS_PATH), {"task_ids": chunk})
            page = await self._follow_pages(call)
            if not isinstance(page, TaskPage):
                return page
            found.extend(page.tasks)
        return TaskPage(found)

    async def list_tasks(
        self,
        *,
        state: str | None = None,
        reference: str | None = None,
        created_at: str | None = None,
    ) -> TaskPage | Failure:
        """The task list with the documented filters, following every `next` link."""
        params = {
            name: value
            for name, value in (
                ("state", state),
                ("reference", reference),
                ("created_at", created_at),
            )
            if value is not None
        }
        url = self._url(TASKS_PATH) + (f"?{urlencode(params)}" if params else "")
        return await self._follow_pages(ApiCall("task_list", "GET", url))

    async def task_group(self, reference: str) -> ApiTaskGroup | Failure:
        """`GET /api/v2/scm/task-groups/{reference}/`."""
        segment = _path_segment(reference)
        if segment is None:
            return _unusable_segment(reference, "reference")
        url = self._url(f"{TASK_GROUPS_PATH}{segment}/")
        result = await self._reads.call(ApiCall("task_group", "GET", url))
        if not isinstance(result, ApiResponse):
            return result
        return _parse(ApiTaskGroup, json_object(result.body), "task_group")

    async def me(self, *, retry: bool = True) -> dict[str, Any] | Failure:
        """`GET /api/v2/me/`: proves the token and the base URL work (the relay's start-up
        check asks once: an outage there must not delay the start)."""
        call = ApiCall("me", "GET", self._url(ME_PATH))
        result = await (self._reads.call(call) if retry else self._attempt(call))
        if not isinstance(result, ApiResponse):
            return result
        return json_object(result.body)

    # -- the one path every call takes ---------------------------------------

    def _url(self, path: str) -> str:
        return f"{self._base}{path}"

    def _now(self) -> float:
        return self._clock() if self._clock else asyncio.get_running_loop().time()

    async def _follow_pages(self, call: ApiCall) -> TaskPage | Failure:
        tasks: list[ApiTask] = []
        url: str | None = call.url
        for _ in range(MAX_TASK_PAGES):
            if url is None:
                return TaskPage(tasks)
            result = await self._reads.call(ApiCall(call.endpoint, call.method, url, call.body))
            if not isinstance(result, ApiResponse):
                return result
            page = json_object(result.body)
            for item in page.get("results") or []:
                parsed = _parse(ApiTask, item, call.endpoint)
                if isinstance(parsed, Rejected):
                    return parsed
                tasks.append(parsed)
            next_url = page.get("next")
            if not isinstance(next_url, str) or not next_url:
                return TaskPage(tasks)
            # Follow `next` as given (the API's own pagination), resolved against our URL,
            # but only to the base URL's own origin: the token goes with every request.
            url = on_origin(urljoin(url, next_url), self._base)
            if url is None:
                link = urljoin(call.url, next_url)[:200]
                log.error("api_next_link_refused", endpoint=call.endpoint, link=link)
                return Misconfigured(200, f"pagination link off the base URL's host: {link}")
        return PagesExceeded(
            f"{call.endpoint}: more than {MAX_TASK_PAGES} pages", pages=MAX_TASK_PAGES
        )

    async def _attempt(self, call: ApiCall) -> ApiResponse | Failure:
        refusal = self._breaker.refusal()
        if refusal is not None:
            return refusal
        try:
            granted_at, call.slot = await self._limits.acquire(call.is_upload, call.slot)
            call.written = call.answered = False
            try:
                _refuse_if_closed(call, granted_at)
                outcome = await self._http.send(call)
            finally:
                if call.is_upload:
                    self._limits_told(call)
        except (_SendByPassed, asyncio.CancelledError):
            # Nothing was sent, or the caller gave the call up: no verdict on the API,
            # and a half-open breaker's probe must not stay taken for good.
            self._breaker.release()
            raise
        self._breaker.record(outcome)
        return outcome

    def _limits_told(self, call: ApiCall) -> None:
        """How a granted upload ended, for the window of a replica sending alone."""
        if call.answered:
            self._limits.answered()
        elif call.written:
            self._limits.unanswered()
        else:
            self._limits.unsent()


def on_origin(link: str, base_url: str) -> str | None:
    """`link` on the base URL's scheme, host and port; None when it names another host.

    A DRF behind a TLS proxy often builds `http://` links to itself: those are taken
    to the base URL's scheme and port rather than followed in clear text."""
    parts, base = urlsplit(link), urlsplit(base_url)
    if parts.hostname is None or parts.hostname != base.hostname:
        return None
    return urlunsplit((base.scheme, base.netloc, parts.path, parts.query, ""))


def _parse(model: type[_Model], data: Any, endpoint: str) -> _Model | Rejected:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problem = str(exc)
    # A 200 we cannot read is the vendor's change or a proxy's page: loud, not retried.
    log.error("api_unexpected_body", endpoint=endpoint, problem=problem[:300])
    return Rejected(200, {"detail": f"unexpected {endpoint} body: {problem}"}, str(data)[:500])


def _path_segment(text: str) -> str | None:
    """`text` as one URL path segment (`/`, `?`, `#`, `%` and the rest percent-encoded),
    or None for "", "." and "..": URL libraries resolve those (even encoded as `%2E`)
    into another path, so no id or reference can be sent as them."""
    if text in ("", ".", ".."):
        return None
    return quote(text, safe="")


def _unusable_segment(text: str, what: str) -> Rejected:
    """What the API says of an id it does not know, without asking it."""
    detail = f"no {what} can be {text!r}: it cannot be one segment of a URL path"
    return Rejected(404, {"detail": detail}, "")
