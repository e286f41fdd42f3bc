"""An upload's slot taken before its intent's transaction, and checked again once its
connection is ready (issue 29): on the simulation's virtual loop, so that the clock
moves only when the test says, and a "busy event loop" is a jump of the clock."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from pydantic import AnyHttpUrl, SecretStr

from service.scantrust.client import ScantrustClient, UploadRequest
from service.scantrust.limits import INPUT, RateLimits
from service.settings import ApiSettings
from sim.vloop import VirtualLoop

RATE = 10.0  # slots of (1 + 0.03) / 10 = 0.103 s
T = TypeVar("T")
# Another replica owns partition 2 of 3: this one sends in the slots of 0 and 1 (a replica
# owning every partition sends alone, in its window of answers, and has no slots).
SHARED, OF = [0, 1], 3


def on_virtual_loop(test: Callable[[VirtualLoop, RateLimits], Awaitable[T]]) -> T:
    loop = VirtualLoop()
    try:
        limits = RateLimits(RATE, 3000, wall_clock=loop.time)
        limits.assigned(INPUT, SHARED, OF)
        return loop.run_until_complete(test(loop, limits))
    finally:
        loop.close()


def test_a_slot_reserved_before_the_intent_commits_is_used_when_it_comes() -> None:
    async def check(loop: VirtualLoop, limits: RateLimits) -> Any:
        loop.advance(100.024)  # just after a slot's tolerance: the next one is 92 ms away
        reserved = limits.reserve_upload()
        assert reserved is not None
        await asyncio.sleep(0.04)  # the intent's transaction, shorter than the slot's wait
        granted_at, slot = await limits.acquire(True, reserved)
        return reserved, slot, granted_at

    reserved, slot, granted_at = on_virtual_loop(check)
    assert slot == reserved, "the slot reserved early was given up"
    assert granted_at == reserved.start, "the upload waited past its slot's start"


def test_a_transaction_longer_than_the_slot_takes_the_next_one() -> None:
    async def check(loop: VirtualLoop, limits: RateLimits) -> Any:
        loop.advance(100.0)
        reserved = limits.reserve_upload()
        assert reserved is not None
        await asyncio.sleep(0.5)  # the intent's transaction outlasted the slot
        granted_at, slot = await limits.acquire(True, reserved)
        return reserved, slot, granted_at

    reserved, slot, granted_at = on_virtual_loop(check)
    assert slot is not None
    assert slot.index > reserved.index
    assert abs(granted_at - slot.start) <= 0.01


def test_an_upload_late_for_its_slot_when_its_connection_is_ready_waits_for_the_next() -> None:
    async def check(loop: VirtualLoop, limits: RateLimits) -> Any:
        loop.advance(100.0)
        _, slot = await limits.acquire(True)
        assert slot is not None
        on_time = await limits.on_time(slot)
        assert on_time == slot, "a request on time was held back"
        # Opening the connection (or a busy loop) took 50 ms: past the 10 ms tolerance.
        loop.advance(0.05)
        late_from = loop.time()
        moved = await limits.on_time(slot)
        return slot, moved, late_from, loop.time(), limits.slots_missed

    slot, moved, late_from, sent_at, missed = on_virtual_loop(check)
    assert moved.index > slot.index
    assert sent_at >= moved.start, "sent before the slot it waited for"
    assert sent_at - moved.start <= 0.01
    assert sent_at > late_from
    assert missed == 1


def test_the_next_slot_after_a_late_one_is_this_replica_s_own() -> None:
    async def check(loop: VirtualLoop, limits: RateLimits) -> Any:
        limits.assigned(INPUT, [1], 3)  # one partition of three: every third slot
        loop.advance(100.0)
        _, slot = await limits.acquire(True)
        assert slot is not None
        loop.advance(0.05)
        return slot, await limits.on_time(slot)

    slot, moved = on_virtual_loop(check)
    assert slot.index % 3 == 1
    assert moved.index % 3 == 1
    assert moved.index == slot.index + 3, "a slot of another replica's partition was taken"


# -- through the client, over loopback HTTP ----------------------------------------------

REQUEST_ANSWER = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 17\r\n"
    b"Connection: close\r\n\r\n"
    b'{"task_id": "t1"}'
)


async def _upload_late(late_by_s: float, window_s: float) -> tuple[Any, list[bytes], RateLimits]:
    """One upload through a client whose event loop is "busy" for `late_by_s` between
    the slot's grant and the connection (its wall clock jumps by that much then), under
    an intent whose window closes `window_s` from now. Returns the outcome, what the
    server received, and the limits."""
    import time

    from tests.api_support import raw_server

    busy = [0.0]
    limits = RateLimits(RATE, 3000, wall_clock=lambda: time.time() + busy[0])
    limits.assigned(INPUT, SHARED, OF)  # its slots come once they settled, a second from now
    granted = limits.acquire

    async def acquire_then_busy(is_upload: bool, reserved: Any = None) -> Any:
        result = await granted(is_upload, reserved)
        busy[0] += late_by_s
        return result

    limits.acquire = acquire_then_busy  # type: ignore[method-assign]
    received: list[bytes] = []
    loop = asyncio.get_running_loop()
    async with raw_server(REQUEST_ANSWER, received) as url:
        config = ApiSettings(base_url=AnyHttpUrl(url), token=SecretStr("t0ken-under-test"))
        async with ScantrustClient(config, limits=limits) as api:
            outcome = await api.upload(
                UploadRequest(constraints={"extended_id": ["a"]}, scm_data={"x": "1"}),
                send_by=time.time() + window_s,
                deadline=loop.time() + window_s,
            )
    return outcome, received, limits


async def test_the_client_holds_an_upload_late_for_its_slot_until_its_next_slot() -> None:
    from service.scantrust.outcomes import Accepted

    outcome, received, limits = await _upload_late(late_by_s=0.05, window_s=30)
    assert outcome == Accepted("t1")
    assert len(received) == 1
    assert limits.slots_missed >= 1, "sent 50 ms after its slot: checked only before connecting"


async def test_an_upload_whose_window_closes_while_it_waits_for_a_slot_is_not_sent() -> None:
    from service.scantrust.outcomes import Expired

    # Half a second passes between the slot's grant and the connection: the window, open
    # when the slot was granted, has closed.
    outcome, received, _ = await _upload_late(late_by_s=0.5, window_s=0.25)
    assert received == [], "sent after its intent's send window closed"
    assert isinstance(outcome, Expired)
