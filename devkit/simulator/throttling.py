"""The API's throttles, as Django REST framework applies them.

The vendor's API is built on Django REST framework (its 429 body is DRF's
`Throttled` exception: "Request was throttled. Expected available in x
seconds.", code "throttled"), so the simulator throttles with DRF's rule rather
than with anything of the relay's: `SimpleRateThrottle` in DRF's
`rest_framework/throttling.py`, `APIView.check_throttles` in
`rest_framework/views.py` and `Throttled` in `rest_framework/exceptions.py`
(encode/django-rest-framework).
"""

from __future__ import annotations

import math
from collections import deque


class RateThrottle:
    """DRF's `SimpleRateThrottle` for one cache key (one scope and one user): at most
    `num_requests` allowed requests in any `duration` seconds.

    `history` holds the arrival times of allowed requests, newest first (DRF inserts at
    the front and pops the oldest from the end); it outlives the throttle, as DRF's
    cache entry outlives the throttle instance it builds per request with the rate of
    the moment. A refused request is not recorded.
    """

    def __init__(self, num_requests: int, duration: float, history: deque[float]) -> None:
        if num_requests < 1 or duration <= 0:
            raise ValueError(
                f"a throttle needs num_requests >= 1 and duration > 0: {num_requests}/{duration}"
            )
        self.num_requests = num_requests
        self.duration = duration
        self.history = history
        self._now = 0.0

    def allow_request(self, now: float) -> bool:
        """Whether a request arriving at `now` passes; an allowed one is recorded."""
        self._now = now
        # DRF: "Drop any requests from the history which have now passed the throttle
        # duration" (an entry exactly `duration` old is dropped: `<=`).
        while self.history and self.history[-1] <= now - self.duration:
            self.history.pop()
        if len(self.history) >= self.num_requests:
            return False
        self.history.appendleft(now)
        return True

    def wait(self) -> float | None:
        """DRF's recommended wait after a refusal at the last `allow_request` time: the
        time until the oldest request leaves the window, shared among the requests that
        would then be available. None when none would be (DRF's answer after the rate was
        lowered under a longer history: the 429 then names no wait)."""
        if self.history:
            remaining_duration = self.duration - (self._now - self.history[-1])
        else:
            remaining_duration = self.duration
        available_requests = self.num_requests - len(self.history) + 1
        if available_requests <= 0:
            return None
        return remaining_duration / available_requests


class ThrottleHistories:
    """DRF's cache of throttle histories: one per scope and token, outliving the
    throttles built over it."""

    def __init__(self) -> None:
        # (scope, token) -> arrival times of the allowed requests, newest first.
        self._histories: dict[tuple[str, str], deque[float]] = {}

    def throttle(self, scope: str, token: str, num_requests: int, duration: float) -> RateThrottle:
        """The throttle of `scope` for `token` at the rate of the moment."""
        # Built per request with the rate of the moment over a history that stays, as DRF
        # does: a rate changed at run time applies to the history already there.
        history = self._histories.setdefault((scope, token), deque())
        return RateThrottle(num_requests, duration, history)

    def arrivals(self, scope: str, token: str) -> list[float]:
        """When the requests counted for `token` in `scope` arrived, oldest first."""
        return list(reversed(self._histories.get((scope, token), ())))


def check_throttles(throttles: list[RateThrottle], now: float) -> float | None:
    """DRF's `APIView.check_throttles`: every throttle is asked (each one that allows the
    request records it, even when another refuses it); the answer is 0.0 when all
    allowed it, else the longest wait among those that refused (None if none named one)."""
    waits: list[float | None] = [
        throttle.wait() for throttle in throttles if not throttle.allow_request(now)
    ]
    if not waits:
        return 0.0
    named = [wait for wait in waits if wait is not None]
    return max(named) if named else None


def throttled_body(wait_s: float | None) -> dict[str, str]:
    """The documented 429 body. DRF's `Throttled` rounds the wait up to whole seconds and
    says "second" for one (the vendor's template reads "x seconds")."""
    detail = "Request was throttled."
    if wait_s is not None:
        seconds = math.ceil(wait_s)
        unit = "second" if seconds == 1 else "seconds"
        detail = f"{detail} Expected available in {seconds} {unit}."
    return {"detail": detail, "code": "throttled"}


def retry_after(wait_s: float | None) -> str | None:
    """DRF's `Retry-After` value (whole seconds, rounded up as in the detail), or None
    when it would send none."""
    if not wait_s:
        return None
    return str(math.ceil(wait_s))
