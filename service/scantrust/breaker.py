"""The API client's circuit breaker, as the relay reports it.

`core.resilience.CircuitBreaker` decides; this keeps what the client says of it:
each change of state logged and observed, and the reason of the last failure,
which a refusal carries so that an open breaker says what opened it.
"""

from __future__ import annotations

from collections.abc import Callable

import structlog

from service.core.resilience import BreakerState, CircuitBreaker
from service.scantrust.exchange import ApiResponse
from service.scantrust.observer import ApiObserver
from service.scantrust.outcomes import Ambiguous, Failure, Unavailable

log = structlog.get_logger(__name__)


class ReportedBreaker:
    """A circuit breaker whose changes are logged and observed."""

    def __init__(
        self,
        failures: int,
        cooldown_s: float,
        observer: ApiObserver,
        *,
        now: Callable[[], float],
    ) -> None:
        self._breaker = CircuitBreaker(failures, cooldown_s)
        self._observer = observer
        self._now = now
        self._last_failure = "none"

    @property
    def state(self) -> BreakerState:
        """The breaker's state now."""
        return self._breaker.state

    def refusal(self) -> Unavailable | None:
        """None when a call may go (a half-open breaker lets one probe through, which
        `record` or `release` must end); otherwise the outcome a refused call gets."""
        before = self._breaker.state
        allowed = self._breaker.allow(self._now())
        self._note(before)
        if allowed:
            return None
        retry_in = self._breaker.retry_in(self._now())
        reason = f"circuit breaker open (last failure: {self._last_failure})"
        return Unavailable(reason, retry_after_s=retry_in or None)

    def release(self) -> None:
        """The call let through was never sent, or was given up: no verdict on the API."""
        self._breaker.release()

    def record(self, outcome: ApiResponse | Failure) -> None:
        """What the call let through got: an outage or a lost answer counts against the
        API, anything else (an answer, even a refusal) for it."""
        before = self._breaker.state
        if isinstance(outcome, Unavailable | Ambiguous):
            self._last_failure = outcome.reason
            self._breaker.record_failure(self._now())
        else:
            self._breaker.record_success()
        self._note(before)

    def _note(self, before: BreakerState) -> None:
        after = self._breaker.state
        if after is not before:
            log.warning("api_circuit_breaker", state=after.value, previous=before.value)
            self._observer.breaker_changed(after)
