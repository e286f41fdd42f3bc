"""Review of the upload slots checked on the ready connection (commit 9079053) and of the
early-signal handlers of `scm-relay run` (commit fec5fc1): each test is a defect found,
and fails until it is fixed."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable
from typing import Any

import pytest
from pydantic import AnyHttpUrl, SecretStr

from service.cli import main
from service.scantrust.client import ScantrustClient, UploadRequest
from service.scantrust.limits import INPUT, RateLimits
from service.scantrust.outcomes import Ambiguous, Expired, Unavailable
from service.settings import ApiSettings
from tests.api_support import raw_server
from tests.settings_support import clear_relay_environment

RATE = 10.0
ANSWER = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 17\r\n"
    b"Connection: close\r\n\r\n"
    b'{"task_id": "t1"}'
)
REQUEST = UploadRequest(constraints={"extended_id": ["a"]}, scm_data={"x": "1"})


def _limits_with(after_grant: Callable[[RateLimits, list[float]], None]) -> RateLimits:
    """Limits on the wall clock plus an offset; `after_grant` runs once a slot is granted
    and before the connection is made (a rebalance, a clock step)."""
    offset = [0.0]
    limits = RateLimits(RATE, 3000, wall_clock=lambda: time.time() + offset[0])
    granted = limits.acquire

    async def acquire_then(is_upload: bool, reserved: Any = None) -> Any:
        result = await granted(is_upload, reserved)
        after_grant(limits, offset)
        return result

    limits.acquire = acquire_then  # type: ignore[method-assign]
    return limits


async def _upload(limits: RateLimits, window_s: float, **config: Any) -> tuple[Any, list[bytes]]:
    received: list[bytes] = []
    loop = asyncio.get_running_loop()
    async with raw_server(ANSWER, received) as url:
        settings = ApiSettings(
            base_url=AnyHttpUrl(url), token=SecretStr("t0ken-under-test"), **config
        )
        async with ScantrustClient(settings, limits=limits) as api:
            outcome = await api.upload(
                REQUEST, send_by=time.time() + window_s, deadline=loop.time() + window_s
            )
    return outcome, received


async def test_an_upload_left_without_input_partitions_while_connecting_is_not_ambiguous() -> None:
    """A rebalance's assignment gives this replica no input partition while an upload
    granted a slot opens its connection (the share changes at the assignment; uploads
    under way go on). `on_time` then waits on `_changed` inside the connector, outside
    aiohttp's connect timeout, until the request's total timeout fires: aiohttp raises
    TimeoutError and `HttpExchange.send` reports `Ambiguous("no answer before timeout")` for an
    upload that was never written. The uploader then reconciles (look-ups, the list's
    lag) a batch it knows nothing of, and the breaker counts an outage; meanwhile the
    upload held a pooled connection for the whole request timeout."""

    def lose_every_partition(limits: RateLimits, _offset: list[float]) -> None:
        limits.assigned(INPUT, [], 3)

    limits = _limits_with(lose_every_partition)
    outcome, received = await _upload(limits, window_s=30.0, request_timeout_s=0.5)
    assert received == []
    assert not isinstance(outcome, Ambiguous), f"never sent, yet reported {outcome!r}"


async def test_a_wall_clock_stepped_back_while_connecting_is_not_ambiguous() -> None:
    """The wall clock steps back (an NTP step) by more than the request timeout between
    the slot's grant and the ready connection. `on_time` finds the slot unusable and
    reserves the next one from `_next`, which still counts from before the step, then
    sleeps the step's length for it: the total timeout fires first and the never-sent
    upload is reported Ambiguous. The clock-jump check that would say Expired runs only
    after that wait (`send_window_closed` in `_on_time`)."""

    def step_back(_limits: RateLimits, offset: list[float]) -> None:
        offset[0] -= 5.0

    limits = _limits_with(step_back)
    outcome, received = await _upload(limits, window_s=30.0, request_timeout_s=0.5)
    assert received == []
    assert not isinstance(outcome, Ambiguous), f"never sent, yet reported {outcome!r}"


async def test_a_probe_upload_whose_window_closes_at_the_connection_frees_the_breaker() -> None:
    """The breaker is half-open and the upload is its one probe (`allow` set
    `_probe_in_flight`). Its slot has passed when its connection is ready, and its send
    window closes while it waits for the next one: the connector raises `_SendByPassed`
    out of `_attempt`, which records neither success nor failure. The breaker stays
    half-open with a probe "in flight" for good: every later call, upload or read, is
    refused as "circuit breaker open" until the process restarts. (The window check
    after `acquire` in `_attempt` had the same hole; this commit adds a second, likelier
    way in: the wait for the next slot.)"""

    def busy(_limits: RateLimits, offset: list[float]) -> None:
        offset[0] += 0.5  # the event loop was busy: the slot and the window have passed

    limits = _limits_with(busy)
    received: list[bytes] = []
    loop = asyncio.get_running_loop()
    async with raw_server(ANSWER, received) as url:
        config = ApiSettings(
            base_url=AnyHttpUrl(url),
            token=SecretStr("t0ken-under-test"),
            breaker_failures=1,
            breaker_cooldown_s=0.05,
        )
        async with ScantrustClient(config, limits=limits) as api:
            api._breaker.record(Unavailable("connection refused"))  # an outage opened it
            await asyncio.sleep(0.1)  # its cool-down passed: the next call is the probe
            outcome = await api.upload(
                REQUEST, send_by=time.time() + 0.25, deadline=loop.time() + 0.25
            )
            assert isinstance(outcome, Expired)
            later = await api.me(retry=False)
    assert not (isinstance(later, Unavailable) and "circuit breaker" in later.reason), (
        f"the breaker stays half-open after a probe that was never sent: {later!r}"
    )


def test_run_with_invalid_settings_leaves_the_signal_handlers_as_it_found_them(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`_run` replaces SIGTERM's and SIGINT's handlers with ones that only append to a
    list, and only the event loop's `add_signal_handler` (later, in `run_relay`) ever
    replaces them again. When `scm-relay run` returns before that (settings refused by
    `load_settings`, or the API client refusing a missing token in `run_relay`), an
    in-process caller, such as a test session that calls `cli.main(["run"])`, is left
    with Ctrl-C and SIGTERM silently swallowed for the rest of its life."""
    clear_relay_environment(monkeypatch)
    monkeypatch.setenv("SCM_RELAY_HTTP_PORT", "not-a-port")
    before = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        assert main(["run"]) == 2
        after = {signum: signal.getsignal(signum) for signum in before}
    finally:
        for signum, handler in before.items():
            signal.signal(signum, handler)
    assert "SCM_RELAY_HTTP_PORT" in capsys.readouterr().err
    assert after == before, "the early-signal handlers outlived `scm-relay run`"
