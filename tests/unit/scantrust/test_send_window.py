"""An upload's send window in the API client: kept on the wall clock (the intent's
`send_by`) and on the event loop's monotonic clock, and refused when the two disagree."""

from __future__ import annotations

import asyncio
import time

import pytest
from pydantic import AnyHttpUrl, SecretStr

from service.scantrust.client import (
    CLOCK_JUMP_S,
    ScantrustClient,
    UploadRequest,
    send_window_closed,
)
from service.scantrust.outcomes import Accepted, Expired
from service.settings import ApiSettings
from tests.api_support import raw_server

REQUEST = UploadRequest(constraints={"extended_id": ["a"]}, scm_data={"x": "1"})
ANSWER = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 17\r\n"
    b"Connection: close\r\n\r\n"
    b'{"task_id": "t1"}'
)


def client(base_url: str) -> ScantrustClient:
    return ScantrustClient(
        ApiSettings(base_url=AnyHttpUrl(base_url), token=SecretStr("t0ken-under-test"))
    )


async def test_an_upload_is_sent_only_within_its_window_by_both_clocks() -> None:
    requests: list[bytes] = []
    now, loop = time.time(), asyncio.get_running_loop()
    async with raw_server(ANSWER, requests) as url, client(url) as api:
        # The wall clock says 10 s are left, the monotonic clock that the window has
        # passed (a VM whose wall clock lags after a suspend): not sent.
        lagging = await api.upload(REQUEST, send_by=now + 0.5, deadline=loop.time() - 0.1)
        assert lagging == Expired(now + 0.5)
        # The two disagree by 8 s about the time left: the wall clock jumped. Not sent.
        jumped = await api.upload(REQUEST, send_by=now + 10, deadline=loop.time() + 2)
        assert isinstance(jumped, Expired)
        assert jumped.clock_jump_s == pytest.approx(8, abs=0.5)
        assert requests == []
        # Both agree and the window is open: sent.
        fine = await api.upload(REQUEST, send_by=time.time() + 10, deadline=loop.time() + 10)
        assert fine == Accepted("t1")
        assert len(requests) == 1


def test_the_rule_refuses_a_jump_either_way_and_a_closed_window_on_either_clock() -> None:
    # send_by 100 on the wall clock and deadline 50 on the monotonic one: the same moment.
    assert send_window_closed(100.0, 50.0, wall=95.0, monotonic=45.0) is None
    assert send_window_closed(100.0, 50.0, wall=95.0 - CLOCK_JUMP_S, monotonic=45.0) is None
    behind = send_window_closed(100.0, 50.0, wall=93.0, monotonic=45.0)
    assert behind is not None
    assert behind.clock_jump_s == pytest.approx(2.0)
    ahead = send_window_closed(100.0, 50.0, wall=99.0, monotonic=45.0)
    assert ahead is not None
    assert ahead.clock_jump_s == pytest.approx(-4.0)
    assert send_window_closed(100.0, 50.0, wall=100.0, monotonic=50.0) == Expired(100.0)
    assert send_window_closed(None, 50.0, wall=0.0, monotonic=50.0) == Expired(0.0)
    assert send_window_closed(100.0, None, wall=100.0, monotonic=0.0) == Expired(100.0)
    assert send_window_closed(None, None, wall=1e12, monotonic=1e12) is None
