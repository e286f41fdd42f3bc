"""The simulation's virtual loop (sim/vloop.py): a clock that jumps, and replicas
that can be paused or killed between any two of their steps."""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections.abc import Coroutine, Iterator
from typing import Any

import pytest

from sim import vloop
from sim.model_support import close
from sim.vloop import REPLICA, VirtualLoop


@pytest.fixture
def loop() -> Iterator[VirtualLoop]:
    virtual = VirtualLoop()
    try:
        yield virtual
    finally:
        close(virtual)


def in_replica(
    loop: VirtualLoop, replica: str | None, coro: Coroutine[Any, Any, None]
) -> asyncio.Task[None]:
    context = contextvars.copy_context()
    context.run(REPLICA.set, replica)
    return loop.create_task(coro, context=context)


async def ticking(log: list[tuple[str, float]], who: str, times: int) -> None:
    """Note the time once a second, `times` times."""
    loop = asyncio.get_running_loop()
    for _ in range(times):
        await asyncio.sleep(1.0)
        log.append((who, loop.time()))


def test_the_clock_jumps_to_the_next_timer(loop: VirtualLoop) -> None:
    fired: list[tuple[str, float]] = []

    def fire(name: str) -> None:
        fired.append((name, loop.time()))

    for name, delay in (("late", 3600.0), ("early", 0.5), ("tie-1", 60.0), ("tie-2", 60.0)):
        loop.call_later(delay, fire, name)
    started = time.monotonic()
    loop.run_until_complete(asyncio.sleep(7200.0))
    assert time.monotonic() - started < 5.0  # an hour of timers takes no real hour
    assert loop.time() == 7200.0
    # By time, ties in the order they were set.
    assert fired == [("early", 0.5), ("tie-1", 60.0), ("tie-2", 60.0), ("late", 3600.0)]


def test_a_paused_replica_waits_and_goes_on_in_order_when_resumed(loop: VirtualLoop) -> None:
    log: list[tuple[str, float]] = []
    in_replica(loop, "r", ticking(log, "r", 4))
    in_replica(loop, None, ticking(log, "other", 6))
    loop.call_later(1.5, loop.pause, "r")
    loop.call_later(4.5, loop.resume, "r")
    loop.run_until_complete(asyncio.sleep(10.0))
    # While paused (1.5 to 4.5 s) r ran nothing; the other ran on. Its step due at 2 s ran
    # at the resume, and it went on from there, in order.
    assert [t for who, t in log if who == "r"] == [1.0, 4.5, 5.5, 6.5]
    assert [t for who, t in log if who == "other"] == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]


def test_a_killed_replica_runs_nothing_again(loop: VirtualLoop) -> None:
    log: list[tuple[str, float]] = []
    cleaned: list[str] = []

    async def victim() -> None:
        try:
            await ticking(log, "r", 5)
        finally:
            cleaned.append("finally")  # SIGKILL: never

    in_replica(loop, "r", victim())
    in_replica(loop, None, ticking(log, "other", 5))
    loop.call_later(2.5, loop.kill, "r")
    loop.run_until_complete(asyncio.sleep(10.0))
    assert [t for who, t in log if who == "r"] == [1.0, 2.0]
    assert [t for who, t in log if who == "other"] == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert cleaned == []


def test_a_kill_at_a_step_of_the_replica_stops_it_between_two_awaits(loop: VirtualLoop) -> None:
    log: list[tuple[str, float]] = []
    in_replica(loop, "r", ticking(log, "r", 5))
    loop.run_until_complete(asyncio.sleep(0))  # the task's first step ran
    # Each second takes two steps: the timer's, then the task's (which notes the time).
    loop.at_step[("r", loop.steps["r"] + 4)] = lambda: loop.kill("r")
    loop.run_until_complete(asyncio.sleep(10.0))
    assert log == [("r", 1.0)]  # the step that would have noted 2.0 never ran
    assert "r" in loop.killed


def test_a_timeout_left_while_paused_does_not_fire_after_the_resume(loop: VirtualLoop) -> None:
    """A replica paused between a wake-up and its timeout's timer: on the resume the
    wake-up runs first and leaves the `asyncio.timeout` block, which cancels the timer;
    the timer, set aside while paused, must not run (asyncio's timeout fails its state
    check there: the world took the error in the callback for a crash)."""
    outcome: list[str] = []
    answer: asyncio.Future[str] = loop.create_future()
    unhandled: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: unhandled.append(context))

    async def waits() -> None:
        try:
            async with asyncio.timeout(2.0):
                outcome.append(await answer)
            await asyncio.sleep(1.0)
            outcome.append("went on")
        except BaseException as exc:
            outcome.append(type(exc).__name__)
            raise

    in_replica(loop, "r", waits())
    loop.call_later(0.5, loop.pause, "r")
    loop.call_later(1.0, answer.set_result, "answered")  # its wake-up is set aside
    loop.call_later(5.0, loop.resume, "r")  # the timeout's timer (2 s) was set aside too
    loop.run_until_complete(asyncio.sleep(10.0))
    assert outcome == ["answered", "went on"]
    assert unhandled == []


def test_a_busy_loop_stops_the_world(loop: VirtualLoop, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vloop, "BUSY_LIMIT", 1000)

    async def spin() -> None:
        while True:  # noqa: ASYNC110 - the busy loop under test
            await asyncio.sleep(0)  # the clock never moves

    in_replica(loop, "r", spin())
    with pytest.raises(RuntimeError, match="stopped before Future completed"):
        loop.run_until_complete(asyncio.sleep(1.0))
    assert loop.stalled is not None
    assert "busy loop" in loop.stalled
    assert loop.time() == 0.0


def test_a_timer_never_runs_before_its_time_while_others_keep_the_loop_busy(
    loop: VirtualLoop,
) -> None:
    """asyncio runs a timer up to its clock resolution early. With other callbacks ready
    the selector never advances the clock, so a poll waiting for a deadline a hair away
    (a float sum's rounding) woke before it, found the clock short of it and waited
    again, for ever, each of three consumers' polls keeping the others' callbacks ready."""
    deadline = 57.25 + 1.7e-13
    seen: list[float] = []
    busy = 0

    def keep_busy() -> None:
        nonlocal busy
        busy += 1
        if busy < 100:
            loop.call_soon(keep_busy)

    loop.run_until_complete(asyncio.sleep(57.25))
    loop.call_at(deadline, lambda: seen.append(loop.time()))
    loop.call_soon(keep_busy)
    loop.run_until_complete(asyncio.sleep(1.0))
    assert seen == [deadline], "the timer ran with the clock short of its time"
