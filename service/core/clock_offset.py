"""This host's wall clock against the API's, from the `Date` header of its answers.

Upload slots are cut from the wall clock (`service/core/slots.py`): replicas whose
clocks disagree by more than the slots' margin send in each other's slots and draw
429s. Every answer's `Date` header (whole seconds, RFC 9110 section 6.6.1) bounds this
host's offset, `local - server`: the server read its clock between the request
leaving at local time `sent` and the answer arriving at `received`, and wrote the
second `d` it read, so

    sent - d - 1 < offset <= received - d.

Each answer alone leaves a second of doubt; the bounds of many answers, sent at other
fractions of a second, intersect to about one round trip. The intersection is kept
over the last `window` answers, and started again from the latest one when it comes
out empty (a clock was stepped). Why our own: NTP's clients need UDP to a time
server, which a relay's egress does not allow; the API's answers come anyway.

Pure: the caller passes the times.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Offset:
    """This host's wall clock minus the API's: `seconds`, give or take `uncertainty`."""

    seconds: float
    uncertainty: float


class ClockOffset:
    """The offset's bounds from the last answers' `Date` headers."""

    def __init__(self, window: int = 256) -> None:
        if window < 1:
            raise ValueError("the window needs at least one answer")
        self._bounds: deque[tuple[float, float]] = deque(maxlen=window)

    def sample(self, sent: float, received: float, date: int) -> Offset | None:
        """An answer sent at `sent`, received at `received` (this host's wall clock),
        with `Date` second `date`; returns the offset now known (None: no answer yet)."""
        bound = (sent - date - 1.0, received - date)
        self._bounds.append(bound)
        if self._intersection() is None:
            self._bounds.clear()  # a clock was stepped: what came before no longer holds
            self._bounds.append(bound)
        return self.offset

    @property
    def offset(self) -> Offset | None:
        """The middle of the bounds and half their width (None before any answer)."""
        bounds = self._intersection()
        if bounds is None:
            return None
        lower, upper = bounds
        return Offset((lower + upper) / 2, (upper - lower) / 2)

    def _intersection(self) -> tuple[float, float] | None:
        if not self._bounds:
            return None
        lower = max(low for low, _ in self._bounds)
        upper = min(high for _, high in self._bounds)
        return (lower, upper) if lower <= upper else None
