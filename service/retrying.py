"""The one retry helper of the generic loops: tenacity's, with this project's backoff.

tenacity runs the loop (attempt, decide, wait, give up); what each loop retries, how
long it waits and when it gives up stay the caller's, passed in as tenacity's
`retry`, `wait`, `stop`, `before_sleep` and `give_up` (its `retry_error_callback`).
The waits come from `Backoff` (service/core/resilience.py) with the caller's random
source, so a seeded test sees the very delays it saw before the loops moved here;
tenacity's own `wait_random_exponential` draws from the global `random` module.

Not here on purpose: the uploaders' loop (service/relay/batch_upload.py), which keeps a
batch across rebalances, outages and throttling and answers to the relay's shutdown,
and the fenced-restart loop (service/app.py), whose restart count starts again after a
stable incarnation: neither is "call this until it works".
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from random import Random
from typing import Any, TypeVar

from tenacity import AsyncRetrying, RetryCallState
from tenacity.retry import retry_base
from tenacity.stop import stop_base, stop_never

from service.core.resilience import Backoff

_T = TypeVar("_T")

StateHook = Callable[[RetryCallState], Any]


def backoff_wait(backoff: Backoff, rng: Random) -> Callable[[RetryCallState], float]:
    """tenacity's `wait` from a `Backoff`: retry n (from 0) waits `backoff.delay(n, rng)`."""
    return lambda state: backoff.delay(retries_before(state), rng)


def retries_before(state: RetryCallState) -> int:
    """How many retries came before the one being decided (0 after the first attempt):
    tenacity numbers attempts from 1."""
    return state.attempt_number - 1


def last_result(state: RetryCallState) -> Any:
    """What the attempt just made returned (raises what it raised)."""
    assert state.outcome is not None  # noqa: S101 - tenacity sets it before any hook
    return state.outcome.result()


def last_failure(state: RetryCallState) -> BaseException:
    """What the attempt just made raised (for loops that retry exceptions only)."""
    assert state.outcome is not None  # noqa: S101 - tenacity sets it before any hook
    exc = state.outcome.exception()
    assert exc is not None  # noqa: S101 - a loop that retries exceptions only got here
    return exc


async def call_with_retries(
    attempt: Callable[[], Awaitable[_T]],
    *,
    retry: retry_base | Callable[[RetryCallState], bool],
    wait: Callable[[RetryCallState], float],
    stop: stop_base | Callable[[RetryCallState], bool] = stop_never,
    before_sleep: StateHook | None = None,
    give_up: StateHook | None = None,
    sleep: Callable[[float], Awaitable[None]] | None = None,
) -> _T:
    """`attempt()` until `retry` says no (its result, or what it raised, is the answer), or
    `stop` says the wait ahead (`state.upcoming_sleep`) is one too many: then `give_up`'s
    return value is the answer, or without `give_up` the last attempt's own result or
    exception (never tenacity's RetryError wrapper). `before_sleep` sees each retry just
    before its wait, and an exception `sleep` (asyncio.sleep unless given) raises ends the loop
    with it."""

    async def once() -> _T:
        # A coroutine function of its own: tenacity awaits only what it sees is one.
        return await attempt()

    retrying = AsyncRetrying(
        sleep=sleep or asyncio.sleep,
        retry=retry,
        wait=wait,
        stop=stop,
        before_sleep=before_sleep,
        retry_error_callback=give_up,
        reraise=True,
    )
    result: _T = await retrying(once)
    return result
