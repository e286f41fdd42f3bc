"""The account's upload limit shared by a consumer group, without talking to each other.

Scantrust allows 10 uploads per second per account (a sliding window, Django REST
framework's throttle), however many replicas send them. Each replica holding its
own 10/s draws 429s as soon as two drain a backlog; a replica holding
limit x (its partitions / all partitions) in its own sliding window loses up to one
upload per second per replica to rounding (3 replicas: 9/s of 10).

Instead the wall clock is cut into slots of (1 s + margin) / limit, slot `j`
belongs to input partition `j mod P`, and a replica sends an upload only in a slot
of a partition it owns: the group never has more than `limit` slots in any
(1 s + margin), with no rounding loss and no coordination beyond the group's
assignment and clocks kept by NTP. A replica owning every partition gets every
slot. The margin covers the spread of arrival times at the server (network, clock
offsets between hosts, the event loop waking late): a slot whose start has passed
by more than `late_s` is not used.

Pure: the caller passes the time and sleeps.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Slot:
    """A reserved slot: its index and when it starts (wall-clock seconds)."""

    index: int
    start: float


class UploadSlots:
    """Slots of the group's upload limit, and which of them this replica may use."""

    def __init__(self, rate_per_s: float, margin_s: float, late_s: float) -> None:
        if rate_per_s <= 0 or margin_s < 0 or not 0 <= late_s <= margin_s:
            raise ValueError(
                f"slots need a rate > 0 and 0 <= late <= margin, got {rate_per_s}, "
                f"{margin_s}, {late_s}"
            )
        self.length_s = (1.0 + margin_s) / rate_per_s
        self._late_s = late_s
        self._owned: frozenset[int] | None = None  # None: every slot (no group told yet)
        self._partitions = 1
        self._next = 0  # the first slot index not yet reserved

    def share(self, owned: Collection[int], partitions: int) -> None:
        """This replica owns `owned` of the input topic's `partitions` partitions."""
        self._owned = frozenset(p for p in owned if 0 <= p < partitions)
        self._partitions = max(1, partitions)

    @property
    def fraction(self) -> float:
        """The share of the group's slots this replica may use."""
        if self._owned is None:
            return 1.0
        return len(self._owned) / self._partitions

    def owns(self, index: int) -> bool:
        """Whether slot `index` belongs to this replica now."""
        return self._owned is None or index % self._partitions in self._owned

    def reserve(self, now: float) -> Slot | None:
        """The earliest slot of this replica not yet reserved that can still be used at
        or after `now`; None when it owns no partition."""
        if self._owned is not None and not self._owned:
            return None
        index = max(self._next, math.ceil((now - self._late_s) / self.length_s))
        for _ in range(self._partitions):
            if self.owns(index):
                break
            index += 1
        self._next = index + 1
        return Slot(index, index * self.length_s)

    def usable(self, slot: Slot, now: float) -> bool:
        """Whether a request written at `now` still belongs to `slot`."""
        return self.owns(slot.index) and abs(now - slot.start) <= self._late_s
