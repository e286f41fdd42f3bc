"""The account's rate limits as this replica's share of them.

Scantrust's limits are per account (section 2.3 of docs/scantrust-scm-api.md):
10 uploads per second and 3 000 requests per minute, whatever the number of
replicas. Uploads take slots on the wall clock that belong to the input partitions
this replica owns (`service/core/slots.py`, which says why). All requests
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
from service.core.slots import Slot, UploadSlots

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

INPUT: Final = "input"
LEDGER: Final = "ledger"


class RateLimits:
    """This replica's share of the account's limits; one per process."""

    def __init__(
        self,
        upload_rate_per_s: float,
        overall_rate_per_min: int,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._slots = UploadSlots(upload_rate_per_s, SLOT_MARGIN_S, SLOT_LATE_S)
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
            self._slots.share(owned, partitions)
        self._parts[role] = (len(owned), partitions)
        mine = sum(part for part, _ in self._parts.values())
        total = sum(whole for _, whole in self._parts.values())
        share = mine / total if total else 1.0
        # At least one request: a replica without partitions still checks its token.
        self._overall.limit = max(1, math.floor(self._overall_limit * share))
        self._changed.set()
        self._changed = asyncio.Event()

    def wall(self) -> float:
        """The wall clock the slots are read on."""
        return self._wall()

    def reserve_upload(self) -> Slot | None:
        """Reserve this replica's next upload slot now: the caller then commits the
        upload's intent while the slot comes, instead of waiting for one after the other
        (None: no input partition owned; `acquire` waits for one)."""
        return self._slots.reserve(self._wall())

    async def acquire(
        self, is_upload: bool, reserved: Slot | None = None
    ) -> tuple[float, Slot | None]:
        """Wait until a request may be written; returns the wall-clock time it may and,
        for an upload, the slot it goes in (`reserved` when that one is still usable)."""
        slot = reserved if is_upload else None
        while True:
            now = self._wall()
            if is_upload:
                if slot is None:
                    slot = self._slots.reserve(now)
                if slot is None:  # no input partition: wait for an assignment
                    await self._changed.wait()
                    continue
                slot = await self._reach(slot)
                if slot is None:
                    continue  # woke too late, or the partition moved: the next slot
                now = self._wall()
            wait = self._overall.delay(now)
            if wait <= 0:
                self._overall.try_acquire(now)
                return now, slot
            await asyncio.sleep(wait)

    async def on_time(self, slot: Slot) -> Slot:
        """Called once the upload's connection is ready, the last moment before its bytes
        leave: `slot` if it is still usable, else (opening a connection, or an event
        loop busy with other work, took the request past its slot: sent now, it would
        crowd the next slots' requests into one second of the server's window and draw a
        429) the next slot of this replica, waited for."""
        while True:
            if self._slots.usable(slot, self._wall()):
                return slot
            self.slots_missed += 1
            reached: Slot | None = None
            while reached is None:
                following = self._slots.reserve(self._wall())
                if following is None:
                    await self._changed.wait()
                    continue
                reached = await self._reach(following)
            slot = reached

    async def _reach(self, slot: Slot) -> Slot | None:
        """Sleep until `slot` starts; the slot if it is usable then, else None."""
        now = self._wall()
        if slot.start > now:
            await asyncio.sleep(slot.start - now)
        return slot if self._slots.usable(slot, self._wall()) else None
