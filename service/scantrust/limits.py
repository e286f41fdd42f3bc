"""The account's rate limits as this replica's share of them.

Scantrust's limits are per account (section 2.3 of docs/scantrust-scm-api.md):
10 uploads per second and 3 000 requests per minute, whatever the number of
replicas. Uploads take slots on the wall clock that belong to the input partitions
this replica owns (`service/core/slots.py`, which says why), except while it owns
every one of them: it is then the only sender, and its own window of answered
uploads lets it send bursts with no margin. All requests
(uploads, status polls, look-ups) share a sliding minute whose size is the
account's limit times this replica's part of the partitions it works on (input
and ledger): it has no rounding to speak of at 3 000 a minute. A client that
is never told of a group (tests, tools) holds the whole account.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Collection
from typing import Final

from service.core.resilience import SlidingWindowLimiter
from service.core.slots import ALONE, AnsweredWindow, Slot, UploadSlots

# The period of the vendor's overall limit (3000 requests per minute).
OVERALL_PERIOD_S: Final = 60.0
# Widens the overall window so jitter never lets one request too many into the
# server's minute.
OVERALL_MARGIN_S: Final = 0.02
# Upload slots: each second of the limit is stretched by the margin, which must cover
# the spread of arrival times at the server (writing the request, the network, clock
# offsets between hosts); a slot is used only within SLOT_LATE_S of its start.
SLOT_MARGIN_S: Final = 0.03
SLOT_LATE_S: Final = 0.01
# A gained partition's slots wait one period of the server's window (and the margin):
# its previous owner may have used them, or sent a burst as the only sender, until its
# revocation. A replica also waits this long after its first assignment: the process it
# replaces (a restart, a SIGKILL) may have sent a burst just before it ended.
SLOT_SETTLE_S: Final = 1.0 + SLOT_MARGIN_S
# The window of a replica sending alone counts answer times on its own clock: the margin
# covers the rate at which its clock and the server's may drift apart over a second
# (NTP slews by at most 0.5 ms a second) and the server's clock resolution.
ALONE_MARGIN_S: Final = 0.005

INPUT: Final = "input"
LEDGER: Final = "ledger"


class RateLimits:
    """This replica's share of the account's limits; one per process."""

    def __init__(
        self,
        upload_rate_per_s: float,
        overall_rate_per_min: int,
        wall_clock: Callable[[], float] = time.time,
        unanswered_hold_s: float = 30.0,
    ) -> None:
        self._slots = UploadSlots(upload_rate_per_s, SLOT_MARGIN_S, SLOT_LATE_S, SLOT_SETTLE_S)
        # Every upload of this process, in both modes (after a switch from sending alone
        # to the group's slots, its own last second still counts), on this host's
        # monotonic clock: it measures durations here only, and a step of the wall clock
        # must not empty it.
        self._window = _answered_window(upload_rate_per_s)
        self._answered = asyncio.Event()
        # An upload written but never answered may still reach the server's check later
        # (a retransmission, a proxy's queue): counted this much longer (the request
        # timeout) than an answered one.
        self._unanswered_hold_s = unanswered_hold_s
        # When this replica may send alone (monotonic clock): owning every input
        # partition, each for the settle period; None while it does not, or a rebalance
        # is under way. A client never told of a group sends alone from the start.
        self._alone_from: float | None = -math.inf
        self._overall_limit = overall_rate_per_min
        self._overall = SlidingWindowLimiter(
            overall_rate_per_min, OVERALL_PERIOD_S, OVERALL_MARGIN_S
        )
        self._wall = wall_clock
        self._parts: dict[str, tuple[int, int]] = {}  # role -> (owned, total)
        self._changed = asyncio.Event()
        # Uploads whose slot had passed when their connection was ready (see `on_time`).
        self.slots_missed = 0

    @property
    def overall_limit(self) -> int:
        """This replica's requests per minute."""
        return self._overall.limit

    def assigned(self, role: str, owned: Collection[int], partitions: int) -> None:
        """The group gave this replica `owned` of `partitions` partitions in `role`
        (INPUT: the input topic, whose owners upload; LEDGER: the ledger, whose owners
        poll task status)."""
        if role == INPUT:
            self._slots.share(owned, partitions, self._wall())
            if self._slots.fraction < 1:
                self._alone_from = None
            elif self._alone_from is None:
                # Owning every partition now and not before (or since a revoke): one
                # gained at least, which its previous owner may have used until now.
                self._alone_from = _monotonic() + SLOT_SETTLE_S
        self._parts[role] = (len(owned), partitions)
        mine = sum(part for part, _ in self._parts.values())
        total = sum(whole for _, whole in self._parts.values())
        share = mine / total if total else 1.0
        # At least one request: a replica without partitions still checks its token.
        self._overall.limit = max(1, math.floor(self._overall_limit * share))
        self._changed.set()
        self._changed = asyncio.Event()

    def revoking(self, role: str) -> None:
        """A rebalance began: another replica may own some of the input partitions before
        this one hears of its new share, so it stops sending as the only sender."""
        if role == INPUT:
            self._alone_from = None
            self._slots.revoked()

    def wall(self) -> float:
        """The wall clock the slots are read on."""
        return self._wall()

    def _alone(self) -> bool:
        return self._alone_from is not None and self._alone_from <= _monotonic()

    def reserve_upload(self) -> Slot | None:
        """Reserve this replica's next upload slot now: the caller then commits the
        upload's intent while the slot comes, instead of waiting for one after the other
        (None: no input partition owned, or sending alone, which needs no slot; `acquire`
        decides then)."""
        if self._alone():
            return None
        return self._slots.reserve(self._wall())

    async def acquire(
        self, is_upload: bool, reserved: Slot | None = None
    ) -> tuple[float, Slot | None]:
        """Wait until a request may be written; returns the wall-clock time it may and,
        for an upload, its grant: a slot (`reserved` when that one is still usable), or
        one of the window's while this replica sends alone. How every upload granted
        ended must be told: `answered`, `unanswered` or `unsent`."""
        slot = reserved if is_upload else None
        while True:
            if is_upload:
                slot = await self._upload_turn(slot)
            now = self._wall()
            wait = self._overall.delay(now)
            if wait <= 0:
                self._overall.try_acquire(now)
                if is_upload:
                    self._window.granted()
                return now, slot
            await asyncio.sleep(wait)

    def answered(self) -> None:
        """An upload `acquire` granted has its answer now: counted one more period."""
        self._ended(_monotonic())

    def unanswered(self) -> None:
        """An upload `acquire` granted, maybe written, was given up now without an answer:
        counted one more period and the hold (it may reach the server's check later)."""
        self._ended(_monotonic() + self._unanswered_hold_s)

    def unsent(self) -> None:
        """An upload `acquire` granted was never written: its grant is given back."""
        self._window.withdrawn()
        self._wake_waiters()

    def _ended(self, counted_from: float) -> None:
        self._window.answered(counted_from)
        self._wake_waiters()

    def _wake_waiters(self) -> None:
        self._answered.set()
        self._answered = asyncio.Event()

    async def on_time(self, slot: Slot) -> Slot:
        """Called once the upload's connection is ready, the last moment before its bytes
        leave: `slot` if it is still usable, else (opening a connection, or an event
        loop busy with other work, took the request past its slot: sent now, it would
        crowd the next slots' requests into one second of the server's window and draw a
        429; or a rebalance began while it connected, and it no longer sends alone) the
        next turn of this replica, waited for."""
        now = self._wall()
        if slot.alone and self._alone():
            return slot
        if not slot.alone and self._slots.usable(slot, now):
            return slot
        if not slot.alone:
            self.slots_missed += 1
        # Its grant is given back while it waits (its own count must not hold it up).
        self._window.withdrawn()
        try:
            return await self._upload_turn(None)
        finally:
            self._window.granted()

    async def _upload_turn(self, slot: Slot | None) -> Slot:
        """Wait for this replica's next turn to upload: its own window's room while it
        sends alone, else a slot of its partitions (`slot`, reserved before, when still
        usable) when its own window also has room."""
        while True:
            if self._alone():
                wait = self._window.delay(_monotonic())
                if wait == 0:
                    return Slot(ALONE, self._wall())
                await self._wait_for_room(wait)
                continue
            now = self._wall()
            if slot is None or slot.alone:
                slot = self._slots.reserve(now)
            if slot is None:  # no input partition: wait for an assignment
                await self._changed.wait()
                continue
            slot = await self._reach(slot)
            if slot is None:
                continue  # woke too late, or the partition moved: the next slot
            wait = self._window.delay(_monotonic())
            if wait == 0:
                return slot
            slot = None  # this replica's own last second is still full (it sent alone)
            await self._wait_for_room(wait)

    async def _wait_for_room(self, wait: float | None) -> None:
        if wait is None:  # only an answer can make room
            await self._answered.wait()
        else:
            await asyncio.sleep(wait)

    async def _reach(self, slot: Slot) -> Slot | None:
        """Sleep until `slot` starts; the slot if it is usable then, else None."""
        now = self._wall()
        if slot.start > now:
            await asyncio.sleep(slot.start - now)
        return slot if self._slots.usable(slot, self._wall()) else None


def _monotonic() -> float:
    """The event loop's clock (virtual in the simulation), or the process's monotonic
    clock outside a loop (which the default loop reads too)."""
    try:
        return asyncio.get_running_loop().time()
    except RuntimeError:
        return time.monotonic()


def _answered_window(rate_per_s: float) -> AnsweredWindow:
    """`rate_per_s` as whole uploads per period: at least one per second, whole ones
    in a second (2.5/s: 2 a second; the server counts whole requests), and below one a
    second, one per 1/rate seconds."""
    if rate_per_s >= 1:
        return AnsweredWindow(math.floor(rate_per_s), 1.0 + ALONE_MARGIN_S)
    return AnsweredWindow(1, 1.0 / rate_per_s + ALONE_MARGIN_S)
