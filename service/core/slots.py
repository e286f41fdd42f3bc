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

A replica owning every input partition (and that has for a settle period) is alone
in sending uploads, and does not need slots: `AnsweredWindow` lets it send bursts (a
light load's batches due together, a backlog's first second) with no margin at all,
because it counts each upload until one period after its answer came (the caller,
`service/scantrust/limits.py`, decides when it is alone). A partition gained in a
rebalance lends its slots only after the settle period: its previous owner may have
sent anything up to its revocation.

Pure: the caller passes the time and sleeps.
"""

from __future__ import annotations

import math
from bisect import insort
from collections import deque
from collections.abc import Collection
from dataclasses import dataclass

# The index of a grant made by the answered window rather than a slot of the cycle.
ALONE: int = -1


@dataclass(frozen=True, slots=True)
class Slot:
    """A reserved slot: its index and when it starts (wall-clock seconds); index `ALONE`
    for an upload granted by a replica's own answered window, sending alone."""

    index: int
    start: float

    @property
    def alone(self) -> bool:
        return self.index == ALONE


class AnsweredWindow:
    """At most `limit` uploads in any `period_s` at the server, known without a margin,
    a shared clock or the network's delays.

    The server counts an upload in its sliding window from the moment it checks the
    throttle, which is after the request was written and before its answer is sent. So
    an upload written at `now` is refused only if `limit` others were checked after
    `now - period_s`, and each of those was checked before its answer came back here:
    counting every upload from the moment it is granted until `period_s` after its
    answer (for ever while none came) over-counts, never under-counts. The cost is the
    round trip: `limit` per (`period_s` + a round trip) at best."""

    def __init__(self, limit: int, period_s: float) -> None:
        if limit < 1 or period_s <= 0:
            raise ValueError(f"a window needs limit >= 1 and period > 0, got {limit}, {period_s}")
        self._limit = limit
        self._period_s = period_s
        self._open = 0  # granted, no answer yet
        self._leaving: deque[float] = deque()  # when answered ones leave, soonest first

    def delay(self, now: float) -> float | None:
        """How long until an upload may be granted (0: now); None while only an answer
        still to come can make room."""
        while self._leaving and self._leaving[0] <= now:
            self._leaving.popleft()
        excess = self._open + len(self._leaving) - self._limit
        if excess < 0:
            return 0.0
        if excess >= len(self._leaving):
            return None
        return self._leaving[excess] - now

    def granted(self) -> None:
        self._open += 1

    def withdrawn(self) -> None:
        """A granted upload gives its grant back unwritten (it waits for another turn)."""
        self._open = max(0, self._open - 1)

    def answered(self, at: float) -> None:
        """A granted upload ended: it counts until one period after `at` (its answer's
        time, or later for one given up unanswered, which may still reach the server)."""
        self._open = max(0, self._open - 1)
        insort(self._leaving, at + self._period_s)


class UploadSlots:
    """Slots of the group's upload limit, and which of them this replica may use."""

    def __init__(
        self, rate_per_s: float, margin_s: float, late_s: float, settle_s: float = 0.0
    ) -> None:
        if rate_per_s <= 0 or margin_s < 0 or not 0 <= late_s <= margin_s or settle_s < 0:
            raise ValueError(
                f"slots need a rate > 0, 0 <= late <= margin and settle >= 0, got "
                f"{rate_per_s}, {margin_s}, {late_s}, {settle_s}"
            )
        self.length_s = (1.0 + margin_s) / rate_per_s
        self._late_s = late_s
        self._owned: frozenset[int] | None = None  # None: every slot (no group told yet)
        self._partitions = 1
        self._next = 0  # the first slot index not yet reserved
        # A gained partition's slots are used only `settle_s` after it was gained.
        self._settle_s = settle_s
        self._settled_at: dict[int, float] = {}
        self._revoked = False  # the next share counts every partition as gained

    def revoked(self) -> None:
        """A rebalance began: at the next share every partition counts as gained. This
        replica may have been out of the group meanwhile (paused past its session
        timeout) while another owned its partitions and used their slots, or sent alone;
        until that share, uploads under way still use its slots."""
        self._revoked = True

    def share(self, owned: Collection[int], partitions: int, now: float = -math.inf) -> None:
        """This replica owns `owned` of the input topic's `partitions` partitions from
        `now` (the wall clock)."""
        before = frozenset() if self._revoked else (self._owned or frozenset())
        self._revoked = False
        self._owned = frozenset(p for p in owned if 0 <= p < partitions)
        self._partitions = max(1, partitions)
        settled = now + self._settle_s
        self._settled_at = {
            p: (self._settled_at.get(p, -math.inf) if p in before else settled) for p in self._owned
        }

    @property
    def fraction(self) -> float:
        """The share of the group's slots this replica may use."""
        if self._owned is None:
            return 1.0
        return len(self._owned) / self._partitions

    def reserve(self, now: float) -> Slot | None:
        """The earliest slot of this replica not yet reserved that can still be used at
        or after `now`; None when it owns no partition."""
        if self._owned is not None and not self._owned:
            return None
        index = max(self._next, math.ceil((now - self._late_s) / self.length_s))
        while self._owned is not None:
            settled_at = self._settled_at.get(index % self._partitions)
            if settled_at is None:
                index += 1  # another replica's: at most partitions - 1 in a row
            elif settled_at > index * self.length_s:
                # Gained lately: past its settle time at once (each partition jumps once).
                index = max(index + 1, math.ceil(settled_at / self.length_s))
            else:
                break
        self._next = index + 1
        return Slot(index, index * self.length_s)

    def _settled(self, index: int) -> bool:
        if self._owned is None:
            return True
        settled_at = self._settled_at.get(index % self._partitions)
        return settled_at is not None and settled_at <= index * self.length_s

    def usable(self, slot: Slot, now: float) -> bool:
        """Whether a request written at `now` still belongs to `slot`."""
        return self._settled(slot.index) and abs(now - slot.start) <= self._late_s
