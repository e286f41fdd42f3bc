"""The one polling loop of the tests, the simulation and the benchmarks: wait until a
condition holds, and fail naming what was awaited when it does not in time.

A condition is polled, not awaited as an event, because what it reads (a fake, a broker,
a simulator's counters) does not notify anyone when it changes.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable
from functools import partial

# Plain or async, and judged by its truth: a list that is no longer empty will do.
Condition = Callable[[], object]


async def wait_until(
    condition: Condition,
    *,
    what: str = "the condition",
    timeout_s: float = 30.0,
    interval_s: float = 0.05,
) -> float:
    """Poll `condition` (plain or async) every `interval_s` until it is true and return
    the loop's time at which it was seen true; raise TimeoutError naming `what` once
    `timeout_s` have passed without it. The loop's clock, not the wall's: under the
    simulation's virtual loop a bound is virtual seconds, as the model's timeouts are."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        met = condition()
        if inspect.isawaitable(met):
            met = await met
        if met:
            return loop.time()
        if loop.time() >= deadline:
            raise TimeoutError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(interval_s)


# Unit tests poll in-memory fakes: a short interval, and a short bound so a missed
# condition fails fast.
eventually = partial(wait_until, timeout_s=2.0, interval_s=0.01)
