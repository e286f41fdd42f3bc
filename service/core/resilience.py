"""Rate limiting, circuit breaking and backoff: pure, clock-driven decisions.

These are written here rather than taken from a library on purpose:
- Scantrust throttles with Django REST framework's sliding window ("Request
  was throttled. Expected available in x seconds."): at most N requests in any
  window of the period. Token- or leaky-bucket limiters such as aiolimiter let
  a full bucket burst and then refill, which puts up to 2N requests into one
  window and draws 429s. `SlidingWindowLimiter` mirrors the server's rule.
- The breaker and the backoff take the time as an argument, so the pipeline and
  the tests drive them without sleeping; breaker libraries (pybreaker,
  aiobreaker) own their clocks and count exceptions, where we count typed
  outcomes.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass
from enum import StrEnum


class SlidingWindowLimiter:
    """At most `limit` acquisitions in any window of `period_s` seconds.

    `margin_s` widens the window slightly so that network jitter between us and
    the server cannot squeeze one request too many into the server's window.
    """

    def __init__(self, limit: int, period_s: float, margin_s: float = 0.0) -> None:
        if limit < 1 or period_s <= 0:
            raise ValueError(f"a limiter needs limit >= 1 and period > 0, got {limit}/{period_s}")
        self.limit = limit
        self.period_s = period_s + margin_s
        self._granted: deque[float] = deque()

    def delay(self, now: float) -> float:
        """Seconds to wait from `now` until one more acquisition fits (0 if it fits now)."""
        # One expression for both the expiry and the wait, so float rounding can never
        # keep a grant in the window while reporting no wait.
        while self._granted and self._granted[0] + self.period_s <= now:
            self._granted.popleft()
        if len(self._granted) < self.limit:
            return 0.0
        return self._granted[0] + self.period_s - now

    def try_acquire(self, now: float) -> bool:
        """Take one slot at `now` if it fits; True when taken."""
        if self.delay(now) > 0:
            return False
        self._granted.append(now)
        return True


class BreakerState(StrEnum):
    """Circuit-breaker states; the metric exports 0, 1, 2 in this order."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """Stops calls to an API that keeps failing, and probes it after a cool-down.

    Closed: calls pass; `failure_threshold` consecutive failures open it.
    Open: calls are refused until `cooldown_s` has passed, then one probe is let
    through (half-open). The probe's success closes it; its failure reopens it.
    """

    def __init__(self, failure_threshold: int, cooldown_s: float) -> None:
        if failure_threshold < 1 or cooldown_s < 0:
            raise ValueError("a breaker needs failure_threshold >= 1 and cooldown_s >= 0")
        self.failure_threshold = failure_threshold
        self.cooldown_s = cooldown_s
        self._state = BreakerState.CLOSED
        self._consecutive_failures = 0
        self._opened_at = 0.0
        self._probe_in_flight = False

    @property
    def state(self) -> BreakerState:
        """The current state (an open breaker turns half-open only when asked to allow)."""
        return self._state

    def retry_in(self, now: float) -> float:
        """Seconds until an open breaker lets a probe through (0 when not open)."""
        if self._state is not BreakerState.OPEN:
            return 0.0
        return max(0.0, self._opened_at + self.cooldown_s - now)

    def allow(self, now: float) -> bool:
        """May a call start at `now`? A True in half-open state is the one probe."""
        if self._state is BreakerState.CLOSED:
            return True
        if self._state is BreakerState.OPEN:
            if now < self._opened_at + self.cooldown_s:
                return False
            self._state = BreakerState.HALF_OPEN
            self._probe_in_flight = False
        if self._probe_in_flight:
            return False
        self._probe_in_flight = True
        return True

    def record_success(self) -> None:
        """The API answered (any answer but an outage): close."""
        self._state = BreakerState.CLOSED
        self._consecutive_failures = 0
        self._probe_in_flight = False

    def release(self) -> None:
        """The call `allow` let through sent nothing (its window closed before it was
        written, or it was cancelled): neither a success nor a failure, and a probe it
        was goes back, so that the next call may probe."""
        self._probe_in_flight = False

    def record_failure(self, now: float) -> None:
        """The API was unavailable, or the call's fate is unknown."""
        self._consecutive_failures += 1
        if self._state is BreakerState.HALF_OPEN or (
            self._consecutive_failures >= self.failure_threshold
        ):
            self._state = BreakerState.OPEN
            self._opened_at = now
            self._probe_in_flight = False


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential backoff with full jitter (AWS architecture blog, "Exponential Backoff
    And Jitter"): attempt n waits a uniform random time in [0, min(cap, initial * 2**n)].
    """

    initial_s: float = 0.5
    cap_s: float = 30.0

    def delay(self, attempt: int, rng: random.Random) -> float:
        """The wait before retry number `attempt` (0 for the first retry)."""
        ceiling = min(self.cap_s, self.initial_s * (2 ** min(attempt, 32)))
        return rng.uniform(0.0, ceiling)
