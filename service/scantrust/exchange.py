"""One HTTP exchange with the Scantrust API, and its answer as a typed outcome.

The aiohttp session (timeouts, connection pool, TLS), the token sent with each
request (read again when its file changes), the response body read within its
bound, the `Date` header's clock offset, and each answer or transport failure
classified into what the relay acts on (docs/scantrust-api.md). What comes
before an exchange (the circuit breaker, the rate limits, the upload's slot and
send window) is the client's (client.py); the connector hands the one moment
aiohttp leaves between a ready connection and the first byte written back to
the client (`ready`).
"""

from __future__ import annotations

import asyncio
import json
import os
import ssl
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, Final

import aiohttp
import structlog
from aiohttp.connector import Connection
from aiohttp.tracing import Trace
from pydantic import SecretStr

from service import __version__
from service.core.clock_offset import ClockOffset
from service.core.slots import Slot
from service.logs import add_secret
from service.scantrust.observer import ApiObserver
from service.scantrust.outcomes import (
    Ambiguous,
    AuthFailed,
    Failure,
    Misconfigured,
    Rejected,
    Throttled,
    Unavailable,
    throttle_wait,
)
from service.settings import ApiSettings, clean_token, require_token

log = structlog.get_logger(__name__)

ITEM_ENDPOINTS: Final = frozenset({"task", "task_group"})
_CHUNK: Final = 64 * 1024


@dataclass(frozen=True, slots=True)
class ApiResponse:
    """A 2xx answer, its body read (any other answer is a `Failure`)."""

    status: int
    body: str
    retry_after: str | None


@dataclass
class ApiCall:
    """One call as the client makes it, and what its last attempt's request did."""

    endpoint: str
    method: str
    url: str
    body: dict[str, Any] | None = None
    is_upload: bool = False
    send_by: float | None = None  # Unix time; see `ScantrustClient.upload`
    deadline: float | None = None  # the event loop's clock; see `ScantrustClient.upload`
    slot: Slot | None = None  # an upload's slot, reserved early or granted by the limits
    written: bool = False  # the last attempt's request may have left (its connection was ready)
    answered: bool = False  # the last attempt's answer came


# The upload this task is sending, for `_OnTimeConnector` (a request runs in its caller's
# task, so its connection is made in the same context).
_UPLOADING: ContextVar[ApiCall | None] = ContextVar("scantrust_uploading", default=None)


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


class HttpExchange:
    """The session every request goes through, and what an answer means."""

    def __init__(
        self,
        config: ApiSettings,
        observer: ApiObserver,
        *,
        ready: Callable[[ApiCall], Awaitable[None]],
        wall: Callable[[], float],
        now: Callable[[], float],
    ) -> None:
        self._config = config
        self._observer = observer
        self._ready = ready
        self._wall = wall
        self._now = now
        self._session: aiohttp.ClientSession | None = None
        self._clock_offset = ClockOffset()
        self._token = _TokenFile(require_token(config), config.token_file)

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

    async def stop(self) -> None:
        """Close the HTTP session (idempotent)."""
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def reload_token(self) -> bool:
        """Read the token file again if it changed; True when the token changed."""
        return await self._token.reload()

    async def _connection_ready(self) -> None:
        """Called when a request's connection is ready (reused or just opened), just
        before the request is written: an upload's last check (`ready`), after which its
        bytes may leave."""
        call = _UPLOADING.get()
        if call is None:
            return
        await self._ready(call)
        call.written = True  # from here its bytes may leave

    async def send(self, call: ApiCall) -> ApiResponse | Failure:
        """One request and its answer, classified; a transport failure as `Unavailable`
        (nothing was sent) or `Ambiguous` (an upload that may have been processed)."""
        session = self._session
        if session is None:
            raise RuntimeError("ScantrustClient used before start()")
        started = self._now()
        sent_wall = self._wall()
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
                    received_wall = self._wall()
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
        self, call: ApiCall, started: float, outcome: Unavailable | Ambiguous
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


def _classify(
    call: ApiCall,
    status: int,
    body: str,
    retry_after: str | None,
    observer: ApiObserver,
    config: ApiSettings,
) -> ApiResponse | Failure:
    """One HTTP answer as the outcome the relay acts on."""
    if 200 <= status < 300:
        return ApiResponse(status, body, retry_after)
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
    parsed = json_object(body)
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


def json_object(body: str) -> dict[str, Any]:
    try:
        value = json.loads(body)
    except (ValueError, RecursionError):  # not JSON, or nested too deep to parse
        return {}
    return value if isinstance(value, dict) else {}


def api_tls_context(ca_file: Path | None) -> ssl.SSLContext:
    """The system's trusted CAs, plus those of `ca_file` (a private CA, a TLS-inspecting
    proxy's) when given; certificate and host name verification always on."""
    context = ssl.create_default_context()
    if ca_file is not None:
        context.load_verify_locations(cafile=str(ca_file))
    return context
