"""The API client's retries of reads (task status, task lists, `me`).

A read has no side effect, so the client alone retries it: exponential backoff
with full jitter, the API's throttling and `Retry-After` waits honoured, within a
budget of time (docs/design.md section 9, "Retries"). An upload is never retried
here: its caller, the uploaders, owns its retries.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable

import structlog
from tenacity import RetryCallState, retry_if_result

from service.core.resilience import Backoff
from service.retrying import call_with_retries, last_result, retries_before
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

        def wait(state: RetryCallState) -> float:
            # Seen by tenacity's `wait` with the failure itself: a 429's wait or a
            # `Retry-After` is honoured here, before the budget is asked.
            return retry_wait(last_result(state), retries_before(state), self._backoff, self._rng)

        def past_budget(state: RetryCallState) -> bool:
            return self._now() + state.upcoming_sleep > loop_deadline

        def exhausted(state: RetryCallState) -> Failure:
            outcome: Failure = last_result(state)
            log.warning(
                "api_retries_exhausted",
                endpoint=call.endpoint,
                outcome=type(outcome).__name__,
                attempts=state.attempt_number,
            )
            return outcome

        def scheduled(state: RetryCallState) -> None:
            outcome = last_result(state)
            wait_s = state.upcoming_sleep
            self._observer.retry_scheduled(call.endpoint, type(outcome).__name__, wait_s)
            log.info(
                "api_retry",
                endpoint=call.endpoint,
                outcome=type(outcome).__name__,
                reason=getattr(outcome, "reason", None),
                wait_s=round(wait_s, 3),
                attempt=state.attempt_number,
            )

        return await call_with_retries(
            lambda: self._attempt(call),
            retry=retry_if_result(lambda outcome: isinstance(outcome, RETRYABLE)),
            wait=wait,
            stop=past_budget,
            before_sleep=scheduled,
            give_up=exhausted,
        )
