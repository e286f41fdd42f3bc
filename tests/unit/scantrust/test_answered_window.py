"""A replica owning every input partition sends alone, in a window of answered uploads
(issue 29): bursts with no margin, and still never more than the server's limit.

The oracle is the vendor's throttle as Django REST framework writes it (a list of the
times requests passed the check; a request is refused while `limit` of them are newer
than one period), not the relay's code."""

from __future__ import annotations

import asyncio
import heapq
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.core.slots import AnsweredWindow, UploadSlots
from service.scantrust.limits import ALONE_MARGIN_S, INPUT, SLOT_SETTLE_S, RateLimits
from sim.vloop import VirtualLoop

LIMIT, PERIOD = 10, 1.0


def server_refusals(checked_at: list[float], limit: int = LIMIT, period: float = PERIOD) -> int:
    """How many requests DRF's SimpleRateThrottle refuses, checked at these times."""
    history: list[float] = []  # newest first, as DRF keeps it
    refused = 0
    for now in sorted(checked_at):
        while history and history[-1] <= now - period:
            history.pop()
        if len(history) >= limit:
            refused += 1
            continue
        history.insert(0, now)
    return refused


@settings(max_examples=300, deadline=None)
@given(
    forward=st.lists(st.floats(min_value=0.0, max_value=0.5), min_size=40, max_size=40),
    back=st.lists(st.floats(min_value=0.0, max_value=0.5), min_size=40, max_size=40),
    in_flight=st.integers(min_value=1, max_value=12),
)
def test_uploads_granted_by_the_window_never_draw_a_429(
    forward: list[float], back: list[float], in_flight: int
) -> None:
    """`in_flight` uploaders send as fast as the window lets them; each request reaches
    the server's check after its own forward delay and its answer comes back after its
    own return delay, both unknown to the sender and unbounded by any margin. (The
    relay's window is longer than the server's by the margin for the drift of two
    clocks over a second; here it also covers the rounding of floats.)"""
    window = AnsweredWindow(LIMIT, PERIOD + ALONE_MARGIN_S)
    now = 0.0
    answers: list[float] = []  # a heap of answer times of requests under way
    checked: list[float] = []
    for n in range(len(forward)):
        while len(answers) >= in_flight or window.delay(now) != 0.0:
            wait = window.delay(now)
            room_first = wait is not None and (not answers or now + wait < answers[0])
            if room_first and len(answers) < in_flight:
                assert wait is not None
                now += wait
                continue
            now = max(now, heapq.heappop(answers))
            window.answered(now)
        window.granted()
        checked.append(now + forward[n])
        heapq.heappush(answers, now + forward[n] + back[n])
    assert server_refusals(checked) == 0


def test_a_burst_goes_at_once_and_the_next_waits_a_period_after_the_first_answer() -> None:
    window = AnsweredWindow(LIMIT, PERIOD)
    for _ in range(LIMIT):
        assert window.delay(5.0) == 0.0
        window.granted()
    assert window.delay(5.0) is None, "full of uploads not answered yet"
    window.answered(5.2)
    assert window.delay(5.3) == pytest.approx(0.9)
    assert window.delay(6.2) == 0.0
    window.withdrawn()  # one never written gives its grant back
    for _ in range(LIMIT - 3):
        window.answered(5.3)
    assert window.delay(6.2) == 0.0, "the withdrawn grant left room"
    window.granted()
    window.granted()  # one unanswered and seven leaving at 6.3, two more: full
    assert window.delay(6.25) == pytest.approx(0.05), "full again until 5.3's leave"


def test_a_gained_partition_lends_its_slots_only_after_the_settle_period() -> None:
    slots = UploadSlots(10.0, 0.03, 0.01, settle_s=1.03)
    slots.share([0, 1], 2, now=100.0)  # both gained: the first assignment
    first = slots.reserve(100.0)
    assert first is not None
    assert first.start >= 101.03
    slots.share([0], 2, now=200.0)  # gives 1 up, keeps 0: 0's slots at once
    kept = slots.reserve(200.0)
    assert kept is not None
    assert kept.start < 200.2
    slots.share([0, 1], 2, now=300.0)  # gains 1 again: only 0's slots for a second
    early = [slots.reserve(300.0) for _ in range(5)]
    assert all(s is not None and s.index % 2 == 0 for s in early if s and s.start < 301.03)


def test_after_a_revoke_even_partitions_kept_wait_the_settle_period() -> None:
    """A replica paused past its session timeout is dropped from the group; another
    owns its partitions meanwhile and uses their slots (or sends alone). When it comes
    back with the same partitions, their slots wait the settle period: it cannot tell a
    partition kept from one regained."""
    slots = UploadSlots(10.0, 0.03, 0.01, settle_s=1.03)
    slots.share([0], 2, now=100.0)
    slots.revoked()
    during = slots.reserve(150.0)
    assert during is not None
    assert during.start < 150.2, "uploads under way at the revoke still use its slots"
    slots.share([0], 2, now=200.0)
    after = slots.reserve(200.0)
    assert after is not None
    assert after.start >= 201.03


def _on_virtual_loop(test: Any) -> Any:
    loop = VirtualLoop()
    try:
        limits = RateLimits(10.0, 3000, wall_clock=loop.time)
        return loop.run_until_complete(test(loop, limits))
    finally:
        loop.close()


def test_a_replica_alone_sends_a_burst_where_a_shared_one_waits_for_slots() -> None:
    async def burst(loop: VirtualLoop, limits: RateLimits, owned: list[int]) -> list[float]:
        limits.assigned(INPUT, owned, 3)
        loop.advance(SLOT_SETTLE_S + 10)
        granted = [await limits.acquire(True) for _ in range(5)]
        for _ in granted:
            limits.answered()
        return [at for at, _slot in granted]

    async def alone(loop: VirtualLoop, limits: RateLimits) -> list[float]:
        return await burst(loop, limits, [0, 1, 2])

    async def shared(loop: VirtualLoop, limits: RateLimits) -> list[float]:
        return await burst(loop, limits, [0, 1])

    assert max(_on_virtual_loop(alone)) - min(_on_virtual_loop(alone)) == 0.0
    spread = _on_virtual_loop(shared)
    assert max(spread) - min(spread) >= 0.3, "five uploads in slots of 103 ms"


def test_a_replica_that_stops_sending_alone_keeps_its_own_last_second() -> None:
    """Ten uploads sent alone; a replica joins and this one keeps two partitions of three:
    its slots start only once its own ten have left the window, since the joiner's
    first second of slots and its own would otherwise add up."""

    async def check(loop: VirtualLoop, limits: RateLimits) -> Any:
        limits.assigned(INPUT, [0, 1, 2], 3)
        loop.advance(SLOT_SETTLE_S + 10)
        for _ in range(LIMIT):
            await limits.acquire(True)
        answered = loop.time() + 0.05
        loop.advance(0.05)
        for _ in range(LIMIT):
            limits.answered()
        limits.revoking(INPUT)
        limits.assigned(INPUT, [0, 1], 3)
        at, slot = await limits.acquire(True)
        return answered, at, slot

    answered, at, slot = _on_virtual_loop(check)
    assert slot is not None
    assert not slot.alone
    assert at >= answered + PERIOD


def test_an_upload_granted_alone_waits_for_a_slot_when_a_rebalance_begins_meanwhile() -> None:
    async def check(loop: VirtualLoop, limits: RateLimits) -> Any:
        limits.assigned(INPUT, [0, 1, 2], 3)
        loop.advance(SLOT_SETTLE_S + 10)
        _, slot = await limits.acquire(True)
        assert slot is not None
        assert slot.alone
        limits.revoking(INPUT)  # while its connection opened
        assert await asyncio.wait_for(limits.on_time(slot), 5) is not None
        return await limits.on_time(slot), loop.time()

    moved, _ = _on_virtual_loop(check)
    assert not moved.alone, "sent alone after a rebalance began"
