"""The Scantrust SCM API client: the relay's only door to Scantrust (aiohttp).

One `ClientSession` per process. Every attempt goes through one path
(`_attempt`): circuit breaker, rate limiters, the HTTP exchange with timeouts
and a bounded body, classification into a typed outcome. Reads are retried here
(`_call`) with exponential backoff and full jitter that honour throttling
waits; an upload is attempted once and its caller, the uploaders, owns its
retries. Callers get a value or a typed `Failure`; they never see aiohttp
exceptions.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import ssl
from collections.abc import Awaitable, Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Protocol, Self, TypeVar
from urllib.parse import quote, urlencode, urljoin, urlsplit, urlunsplit

import aiohttp
import structlog
from aiohttp.connector import Connection
from aiohttp.tracing import Trace
from pydantic import BaseModel, ConfigDict, SecretStr, ValidationError

from service import __version__
from service.core.clock_offset import ClockOffset, Offset
from service.core.resilience import Backoff, BreakerState, CircuitBreaker
from service.core.slots import Slot
from service.logs import add_secret
from service.scantrust.limits import RateLimits
from service.scantrust.outcomes import (
    RETRYABLE,
    Accepted,
    Ambiguous,
    ApiTask,
    ApiTaskGroup,
    AuthFailed,
    Expired,
    Failure,
    Misconfigured,
    PagesExceeded,
    Rejected,
    TaskPage,
    Throttled,
    Unavailable,
    UploadOutcome,
    retry_wait,
    throttle_wait,
)
from service.settings import ApiSettings, clean_token, require_token

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
ITEM_ENDPOINTS: Final = frozenset({"task", "task_group"})
_CHUNK: Final = 64 * 1024


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


class ApiObserver(Protocol):
    """Hooks for metrics; the composition root passes the Prometheus implementation."""

    def request_finished(self, endpoint: str, status_class: str, duration_s: float) -> None:
        """One HTTP exchange ended; `status_class` is 2xx..5xx or `error` (no response)."""

    def retry_scheduled(self, endpoint: str, outcome: str, wait_s: float) -> None:
        """A call will be retried after `wait_s`."""

    def throttled(self, endpoint: str) -> None:
        """The API answered 429."""

    def ambiguous(self, endpoint: str) -> None:
        """A request was sent and its fate is unknown."""

    def breaker_changed(self, state: BreakerState) -> None:
        """The circuit breaker changed state."""

    def clock_offset(self, offset: Offset) -> None:
        """An answer's `Date` header gave this host's clock offset against the API's."""


class NullObserver:
    """Observes nothing (tools and tests that do not count)."""

    def request_finished(self, endpoint: str, status_class: str, duration_s: float) -> None:
        """Ignore."""

    def retry_scheduled(self, endpoint: str, outcome: str, wait_s: float) -> None:
        """Ignore."""

    def throttled(self, endpoint: str) -> None:
        """Ignore."""

    def ambiguous(self, endpoint: str) -> None:
        """Ignore."""

    def breaker_changed(self, state: BreakerState) -> None:
        """Ignore."""

    def clock_offset(self, offset: Offset) -> None:
        """Ignore."""


@dataclass(frozen=True, slots=True)
class _Response:
    status: int
    body: str
    retry_after: str | None


@dataclass
class _Call:
    endpoint: str
    method: str
    url: str
    body: dict[str, Any] | None = None
    is_upload: bool = False
    params: dict[str, str] = field(default_factory=dict)
    send_by: float | None = None  # Unix time; see `ScantrustClient.upload`
    deadline: float | None = None  # the event loop's clock; see `ScantrustClient.upload`
    slot: Slot | None = None  # an upload's slot, reserved early or granted by the limits
    written: bool = False  # the last attempt's request may have left (its connection was ready)
    answered: bool = False  # the last attempt's answer came


# The upload this task is sending, for `_OnTimeConnector` (a request runs in its caller's
# task, so its connection is made in the same context).
_UPLOADING: ContextVar[_Call | None] = ContextVar("scantrust_uploading", default=None)


class _OnTimeConnector(aiohttp.TCPConnector):
    """aiohttp's connector, with a last check once a request's connection is ready and
    before anything is written on it (aiohttp has no hook between the two: its trace
    callbacks cannot close a connection they refuse). Opening a connection (a TCP and
    TLS handshake) or a busy event loop can take an upload past its slot, and the slot
    was checked before."""

    def __init__(self, ready: Callable[[], Awaitable[None]], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._ready = ready

    async def connect(
        self,
        req: aiohttp.ClientRequest,
        traces: list[Trace],
        timeout: aiohttp.ClientTimeout,  # noqa: ASYNC109 - aiohttp's signature, overridden
    ) -> Connection:
        connection = await super().connect(req, traces, timeout)
        try:
            await self._ready()
        except BaseException:
            connection.close()
            raise
        return connection


class _SendByPassed(Exception):
    """An upload's send window closed before it was sent (see `ScantrustClient.upload`)."""

    def __init__(self, expired: Expired) -> None:
        super().__init__(expired)
        self.expired = expired


def _refuse_if_closed(call: _Call, wall: float) -> None:
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
    ) -> None:
        self._config = config
        self._observer: ApiObserver = observer or NullObserver()
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not cryptography
        self._clock = clock
        self._session: aiohttp.ClientSession | None = None
        self._base = str(config.base_url).rstrip("/")
        self._limits = RateLimits(
            config.upload_rate_per_s,
            config.rate_per_min,
            unanswered_hold_s=config.request_timeout_s,
        )
        self._breaker = CircuitBreaker(config.breaker_failures, config.breaker_cooldown_s)
        self._clock_offset = ClockOffset()
        self._last_failure = "none"
        self._backoff = Backoff(config.retry_initial_s, config.retry_max_backoff_s)
        self._token = _TokenFile(require_token(config), config.token_file)

    @property
    def limits(self) -> RateLimits:
        """This replica's share of the account's limits (the group's assignments set it)."""
        return self._limits

    # -- lifecycle ---------------------------------------------------------

    async def start(self) -> None:
        """Open the HTTP session (idempotent)."""
        if self._session is not None:
            return
        ssl_context = api_tls_context(self._config.ca_file)
        connector = _OnTimeConnector(
            self._connection_ready, limit=self._config.max_connections, ssl=ssl_context
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(
                total=self._config.request_timeout_s, connect=self._config.connect_timeout_s
            ),
            headers={
                "Accept": "application/json",
                "User-Agent": f"scm-relay/{__version__}",
            },
            raise_for_status=False,
        )

    def reserve_upload_slot(self) -> Slot | None:
        """Take this replica's next upload slot now, for an upload about to be made (see
        `upload`); None when it owns no input partition yet."""
        return self._limits.reserve_upload()

    async def _connection_ready(self) -> None:
        """Called when a request's connection is ready (reused or just opened), just
        before the request is written. An upload late for its slot waits for the next
        one, and is not sent at all once its send window has closed meanwhile (the
        connection is then closed unused: nothing was written)."""
        call = _UPLOADING.get()
        if call is None:
            return
        if call.slot is not None:
            await self._on_time(call, call.slot)
        call.written = True  # from here its bytes may leave

    async def _on_time(self, call: _Call, slot: Slot) -> None:
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
        session, self._session = self._session, None
        if session is not None:
            await session.close()

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
        return await self._token.reload()

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
        call = _Call(
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
        if not isinstance(result, _Response):
            return result
        task_id = _json_object(result.body).get("task_id")
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
        result = await self._call(_Call("task", "GET", self._url(f"{TASKS_PATH}{segment}/")))
        if not isinstance(result, _Response):
            return result
        return _parse(ApiTask, _json_object(result.body), "task")

    async def tasks(self, task_ids: Sequence[str]) -> TaskPage | Failure:
        """Many tasks by id with `POST /api/v2/scm/tasks/`, in chunks; ids the API does not
        return are simply absent from the page."""
        found: list[ApiTask] = []
        size = self._config.status_chunk_size
        for start in range(0, len(task_ids), size):
            chunk = list(task_ids[start : start + size])
            call = _Call("tasks_bulk", "POST", self._url(TASKS_PATH), {"task_ids": chunk})
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
        return await self._follow_pages(_Call("task_list", "GET", url))

    async def task_group(self, reference: str) -> ApiTaskGroup | Failure:
        """`GET /api/v2/scm/task-groups/{reference}/`."""
        segment = _path_segment(reference)
        if segment is None:
            return _unusable_segment(reference, "reference")
        url = self._url(f"{TASK_GROUPS_PATH}{segment}/")
        result = await self._call(_Call("task_group", "GET", url))
        if not isinstance(result, _Response):
            return result
        return _parse(ApiTaskGroup, _json_object(result.body), "task_group")

    async def me(self, *, retry: bool = True) -> dict[str, Any] | Failure:
        """`GET /api/v2/me/`: proves the token and the base URL work (the relay's start-up
        check asks once: an outage there must not delay the start)."""
        call = _Call("me", "GET", self._url(ME_PATH))
        result = await (self._call(call) if retry else self._attempt(call))
        if not isinstance(result, _Response):
            return result
        return _json_object(result.body)

    # -- the one path every call takes ---------------------------------------

    def _url(self, path: str) -> str:
        return f"{self._base}{path}"

    def _now(self) -> float:
        return self._clock() if self._clock else asyncio.get_running_loop().time()

    async def _follow_pages(self, call: _Call) -> TaskPage | Failure:
        tasks: list[ApiTask] = []
        url: str | None = call.url
        for _ in range(MAX_TASK_PAGES):
            if url is None:
                return TaskPage(tasks)
            result = await self._call(_Call(call.endpoint, call.method, url, call.body))
            if not isinstance(result, _Response):
                return result
            page = _json_object(result.body)
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

    async def _call(self, call: _Call) -> _Response | Failure:
        """Attempt a read until it succeeds, fails for good, or the retry budget is spent."""
        loop_deadline = self._now() + self._config.retry_max_elapsed_s
        attempt = 0
        while True:
            outcome = await self._attempt(call)
            if isinstance(outcome, _Response) or not isinstance(outcome, RETRYABLE):
                return outcome
            wait = retry_wait(outcome, attempt, self._backoff, self._rng)
            if self._now() + wait > loop_deadline:
                log.warning(
                    "api_retries_exhausted",
                    endpoint=call.endpoint,
                    outcome=type(outcome).__name__,
                    attempts=attempt + 1,
                )
                return outcome
            self._observer.retry_scheduled(call.endpoint, type(outcome).__name__, wait)
            log.info(
                "api_retry",
                endpoint=call.endpoint,
                outcome=type(outcome).__name__,
                reason=getattr(outcome, "reason", None),
                wait_s=round(wait, 3),
                attempt=attempt + 1,
            )
            await asyncio.sleep(wait)
            attempt += 1

    async def _attempt(self, call: _Call) -> _Response | Failure:
        before = self._breaker.state
        allowed = self._breaker.allow(self._now())
        self._note_breaker(before)
        if not allowed:
            retry_in = self._breaker.retry_in(self._now())
            reason = f"circuit breaker open (last failure: {self._last_failure})"
            return Unavailable(reason, retry_after_s=retry_in or None)
        try:
            granted_at, call.slot = await self._limits.acquire(call.is_upload, call.slot)
            call.written = call.answered = False
            try:
                _refuse_if_closed(call, granted_at)
                outcome = await self._exchange(call)
            finally:
                if call.is_upload:
                    self._limits_told(call)
        except (_SendByPassed, asyncio.CancelledError):
            # Nothing was sent, or the caller gave the call up: no verdict on the API,
            # and a half-open breaker's probe must not stay taken for good.
            self._breaker.release()
            raise
        before = self._breaker.state
        if isinstance(outcome, Unavailable | Ambiguous):
            self._last_failure = outcome.reason
            self._breaker.record_failure(self._now())
        else:
            self._breaker.record_success()
        self._note_breaker(before)
        return outcome

    def _limits_told(self, call: _Call) -> None:
        """How a granted upload ended, for the window of a replica sending alone."""
        if call.answered:
            self._limits.answered()
        elif call.written:
            self._limits.unanswered()
        else:
            self._limits.unsent()

    def _note_breaker(self, before: BreakerState) -> None:
        after = self._breaker.state
        if after is not before:
            log.warning("api_circuit_breaker", state=after.value, previous=before.value)
            self._observer.breaker_changed(after)

    async def _exchange(self, call: _Call) -> _Response | Failure:
        session = self._session
        if session is None:
            raise RuntimeError("ScantrustClient used before start()")
        started = self._now()
        sent_wall = self._limits.wall()
        try:
            authorization = {"Authorization": f"UAT {self._token.value}"}
            # Redirects are not followed: one is a wrong base URL (http for https, a moved
            # host), and following it would carry the token wherever it points.
            uploading = _UPLOADING.set(call if call.is_upload else None)
            try:
                async with session.request(
                    call.method,
                    call.url,
                    json=call.body,
                    headers=authorization,
                    allow_redirects=False,
                ) as response:
                    call.answered = True
                    received_wall = self._limits.wall()
                    self._note_date(sent_wall, received_wall, response.headers.get("Date"))
                    body = await _read_bounded(response, self._config.max_response_bytes)
                    status, retry_after = response.status, response.headers.get("Retry-After")
            finally:
                _UPLOADING.reset(uploading)
        except aiohttp.ClientConnectorError as exc:  # refused, DNS, TLS handshake: not sent
            return self._transport_failure(call, started, Unavailable(f"connect: {exc.os_error}"))
        except aiohttp.ConnectionTimeoutError:
            return self._transport_failure(call, started, Unavailable("connect timeout"))
        except TimeoutError:
            return self._transport_failure(call, started, Ambiguous("no answer before timeout"))
        except _BodyTooLarge as exc:
            return self._transport_failure(call, started, Ambiguous(str(exc)))
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
            reason = f"connection lost: {type(exc).__name__}"
            return self._transport_failure(call, started, Ambiguous(reason))
        except (aiohttp.ClientError, ValueError) as exc:
            # A malformed answer (a header over the parser's limit, a redirect loop, a bad
            # URL): the request may have been processed. The message is bounded; it never
            # carries our headers.
            reason = f"unreadable answer: {type(exc).__name__}: {str(exc)[:200]}"
            return self._transport_failure(call, started, Ambiguous(reason))
        self._observer.request_finished(call.endpoint, f"{status // 100}xx", self._now() - started)
        return _classify(call, status, body, retry_after, self._observer, self._config)

    def _note_date(self, sent: float, received: float, date: str | None) -> None:
        """Bound this host's clock offset by an answer's `Date` (ignored when absent or
        unreadable: a proxy's answer, a malformed header)."""
        if not date:
            return
        try:
            second = int(parsedate_to_datetime(date).timestamp())
        except (TypeError, ValueError, IndexError, OverflowError):
            return
        offset = self._clock_offset.sample(sent, received, second)
        if offset is not None:
            self._observer.clock_offset(offset)

    def _transport_failure(
        self, call: _Call, started: float, outcome: Unavailable | Ambiguous
    ) -> Unavailable | Ambiguous:
        self._observer.request_finished(call.endpoint, "error", self._now() - started)
        if isinstance(outcome, Ambiguous) and call.is_upload:
            self._observer.ambiguous(call.endpoint)
        if isinstance(outcome, Ambiguous) and not call.is_upload:
            # A read has no side effect: its lost answer is a plain outage.
            return Unavailable(outcome.reason)
        return outcome


class _TokenFile:
    """The API token, read again from its file (a rotated Kubernetes Secret) when the
    file changed. A file that cannot be read or holds no usable token keeps the current
    token, said in one line that never shows a value."""

    def __init__(self, token: SecretStr, path: Path | None) -> None:
        self._token = token
        self._path = path
        self._stamp: tuple[int, int] | None = None  # (mtime_ns, size) last read

    @property
    def value(self) -> str:
        """The token to send."""
        return self._token.get_secret_value()

    async def reload(self) -> bool:
        """True when the file holds a new token (file I/O in a thread)."""
        path = self._path
        if path is None:
            return False
        try:
            status = await asyncio.to_thread(os.stat, path)
            stamp = (status.st_mtime_ns, status.st_size)
            if stamp == self._stamp:
                return False
            text = await asyncio.to_thread(path.read_text, encoding="utf-8")
            token = clean_token(text)
        except (OSError, ValueError) as exc:
            log.error("api_token_file_unusable", path=str(path), problem=type(exc).__name__)
            return False
        self._stamp = stamp
        if not token or token == self.value:
            return False
        add_secret(token)
        self._token = SecretStr(token)
        log.warning("api_token_reloaded", path=str(path))
        return True


def on_origin(link: str, base_url: str) -> str | None:
    """`link` on the base URL's scheme, host and port; None when it names another host.

    A DRF behind a TLS proxy often builds `http://` links to itself: those are taken
    to the base URL's scheme and port rather than followed in clear text."""
    parts, base = urlsplit(link), urlsplit(base_url)
    if parts.hostname is None or parts.hostname != base.hostname:
        return None
    return urlunsplit((base.scheme, base.netloc, parts.path, parts.query, ""))


def _classify(
    call: _Call,
    status: int,
    body: str,
    retry_after: str | None,
    observer: ApiObserver,
    config: ApiSettings,
) -> _Response | Failure:
    """One HTTP answer as the outcome the relay acts on."""
    if 200 <= status < 300:
        return _Response(status, body, retry_after)
    if 300 <= status < 400:
        log.error(
            "api_redirected",
            endpoint=call.endpoint,
            status=status,
            url=call.url.split("?")[0],
            hint="SCM_RELAY_API_BASE_URL answers with a redirect: set the URL it points to",
        )
        return Misconfigured(status, body)
    if status in (401, 403):
        log.error("api_auth_failed", endpoint=call.endpoint, status=status, body=body[:200])
        return AuthFailed(status, body)
    if status == 429:
        observer.throttled(call.endpoint)
        # Capped: a proxy's or a bug's "Retry-After: 1e9" must not park the relay.
        wait = min(throttle_wait(retry_after, body), config.retry_after_max_s)
        return Throttled(wait, body)
    if status >= 500 and call.is_upload:
        # A gateway may answer 5xx after the application created the task.
        observer.ambiguous(call.endpoint)
        return Ambiguous(f"HTTP {status}", status=status)
    if status >= 500:
        asked = throttle_wait(retry_after, "") if retry_after else None
        if asked is not None:
            asked = min(asked, config.retry_after_max_s)
        return Unavailable(f"HTTP {status}", status=status, retry_after_s=asked)
    parsed = _json_object(body)
    # A 404 for one task or task group by id is an answer: it does not exist.
    if (status == 400 and parsed) or (status == 404 and call.endpoint in ITEM_ENDPOINTS):
        return Rejected(status, parsed if parsed else {"detail": body}, body)
    # A 404 or 405 from a wrong base URL, a proxy's 400 page: not the data's fault.
    log.error(
        "api_misconfigured",
        endpoint=call.endpoint,
        status=status,
        url=call.url.split("?")[0],
        body=body[:200],
        hint="check SCM_RELAY_API_BASE_URL (host and path) and any proxy in front of the API",
    )
    return Misconfigured(status, body)


async def _read_bounded(response: aiohttp.ClientResponse, limit: int) -> str:
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.content.iter_chunked(_CHUNK):
        size += len(chunk)
        if size > limit:
            raise _BodyTooLarge(f"response body over {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks).decode("utf-8", errors="replace")


class _BodyTooLarge(Exception):
    """A response body over `max_response_bytes`."""


def _json_object(body: str) -> dict[str, Any]:
    try:
        value = json.loads(body)
    except (ValueError, RecursionError):  # not JSON, or nested too deep to parse
        return {}
    return value if isinstance(value, dict) else {}


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


def api_tls_context(ca_file: Path | None) -> ssl.SSLContext:
    """The system's trusted CAs, plus those of `ca_file` (a private CA, a TLS-inspecting
    proxy's) when given; certificate and host name verification always on."""
    context = ssl.create_default_context()
    if ca_file is not None:
        context.load_verify_locations(cafile=str(ca_file))
    return context
