"""The API client's retries of reads (task status, task lists, `me`).

A read has no side effect, so the client alone retries it: exponential backoff
with full jitter, the API's throttling and `Retry-After` waits honoured, within a
budget of time (docs/design.md section 9, "Retries"). An upload is never retried
here: its caller, the uploaders, owns its retries.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable

import structlog

from service.core.resilience import Backoff
from service.scantrust.exchange import ApiCall, ApiResponse
from service.scantrust.observer import ApiObserver
from service.scantrust.outcomes import RETRYABLE, Failure, retry_wait

log = structlog.get_logger(__name__)


class ReadRetries:
    """Attempts a read again after each retryable failure while the budget lasts."""

    def __init__(
        self,
        attempt: Callable[[ApiCall], Awaitable[ApiResponse | Failure]],
        backoff: Backoff,
        rng: random.Random,
        observer: ApiObserver,
        *,
        budget_s: float,
        now: Callable[[], float],
    ) -> None:
        self._attempt = attempt
        self._backoff = backoff
        self._rng = rng
        self._observer = observer
        self._budget_s = budget_s
        self._now = now

    async def call(self, call: ApiCall) -> ApiResponse | Failure:
        """Attempt a read until it succeeds, fails for good, or the retry budget is spent."""
        loop_deadline = self._now() + self._budget_s
        attempt = 0
        while True:
            outcome = await self._attempt(call)
            if isinstance(outcome, ApiResponse) or not isinstance(outcome, RETRYABLE):
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
