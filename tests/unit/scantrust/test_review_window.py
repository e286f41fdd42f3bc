"""Review of the answered window (issue 29): cases where a replica that sends alone
drew a 429 or exceeded the configured rate (each failed until fixed).

The oracle is the vendor's throttle as Django REST framework writes it (the times that
requests passed the check; a request is refused while `limit` of them are newer than one
period), not the relay's code. Times given to it are on the virtual loop's clock, which
stands for real time; the relay reads its own wall clock, which a test may step."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

from service.scantrust.limits import INPUT, SLOT_SETTLE_S, RateLimits
from sim.vloop import VirtualLoop
from tests.unit.scantrust.test_answered_window import server_refusals as drf_refusals

T = TypeVar("T")
LIMIT = 10


def _run(
    rate: float,
    test: Callable[[VirtualLoop, RateLimits, list[float]], Awaitable[T]],
) -> T:
    """Run `test` on a virtual loop with a replica alone; the relay's wall clock is the
    loop's clock plus `step[0]`, which the test may change."""
    loop = VirtualLoop()
    step = [0.0]
    try:
        limits = RateLimits(rate, 3000, wall_clock=lambda: loop.time() + step[0])

        async def alone() -> T:
            limits.assigned(INPUT, [0, 1, 2], 3)
            loop.advance(SLOT_SETTLE_S + 10)
            return await test(loop, limits, step)

        return loop.run_until_complete(alone())
    finally:
        loop.close()


def test_a_forward_step_of_the_wall_clock_does_not_forget_the_last_second() -> None:
    """Defect: `AnsweredWindow` is fed the wall clock (`RateLimits.wall`, `time.time`),
    though it only measures a duration on this host (answer + 1 s). When NTP steps the
    wall clock forward (here by 2 s) right after ten answers, every one of them leaves the
    window at once and ten more go in the same real second: the server refuses them
    (429). The window needs a monotonic clock (the event loop's); the opposite step holds
    every upload back for as long as the step."""

    async def check(loop: VirtualLoop, limits: RateLimits, step: list[float]) -> list[float]:
        checked = []
        for _ in range(LIMIT):
            await limits.acquire(True)
            checked.append(loop.time())
        loop.advance(0.05)
        for _ in range(LIMIT):
            limits.answered()
        step[0] = 2.0  # the wall clock is stepped forward
        for _ in range(LIMIT):
            await limits.acquire(True)
            checked.append(loop.time())
            limits.answered()
        return checked

    checked = _run(10.0, check)
    assert drf_refusals(checked) == 0, "uploads sent after a clock step drew 429s"


def test_an_upload_given_up_unanswered_is_not_forgotten_a_second_later() -> None:
    """Defect: docs/design.md section 12 says an upload is counted "for ever while none
    [answer] has" come, and the commit claims no 429 "whatever the network's delays";
    but `_attempt` calls `finished(wall())` when a written request times out, so it is
    counted only until 1 s after the timeout. The server checks the throttle whenever the
    request reaches it (retransmitted segments, a proxy's or the server's queue): ten
    uploads that time out after 30 s and pass the server's check half a second later
    leave room for ten more a second after the timeout, while the server still counts
    the first ten: 429s."""

    async def check(loop: VirtualLoop, limits: RateLimits, step: list[float]) -> list[float]:
        for _ in range(LIMIT):
            await limits.acquire(True)
        loop.advance(30.0)  # the request timeout: no answer came
        for _ in range(LIMIT):
            limits.unanswered()
        late = loop.time() + 0.5  # they reach the server's check half a second later
        checked = [late] * LIMIT
        for _ in range(LIMIT):
            await limits.acquire(True)
            checked.append(loop.time())  # the earliest the server can check it
            limits.answered()
        return checked

    checked = _run(10.0, check)
    assert drf_refusals(checked) == 0, "uploads after a timed-out burst drew 429s"


def test_a_rate_below_one_per_second_is_kept_by_a_replica_alone() -> None:
    """Defect: the window's limit is `max(1, floor(rate))` per 1.005 s, so a configured
    `SCM_RELAY_UPLOAD_RATE_PER_S` below 1 (the setting allows any rate > 0: an account
    with a lower limit, or room kept for another client of the account) is exceeded by a
    replica alone: 0.5 per second configured, about one per second sent, twice the
    account's limit. The slots (used when the replica is not alone) keep it."""
    rate, duration = 0.5, 20.0

    async def check(loop: VirtualLoop, limits: RateLimits, step: list[float]) -> list[float]:
        start = loop.time()
        grants = []
        while loop.time() < start + duration:
            await limits.acquire(True)
            grants.append(loop.time() - start)
            limits.answered()  # at once
        return grants

    grants = _run(rate, check)
    within = [at for at in grants if at < duration]
    assert len(within) <= rate * duration + 1, (
        f"{len(within)} uploads in {duration} s at a configured {rate}/s"
    )
