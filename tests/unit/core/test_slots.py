"""The account's upload limit as wall-clock slots divided by input partitions."""

from __future__ import annotations

import asyncio
from bisect import bisect_left

import pytest
from hypothesis import given
from hypothesis import strategies as st

from service.core.slots import UploadSlots
from service.scantrust.limits import INPUT, LEDGER, RateLimits

RATE, MARGIN, LATE = 10.0, 0.03, 0.01


def most_in_any_second(times: list[float]) -> int:
    ordered = sorted(times)
    return max(
        (bisect_left(ordered, start + 1.0) - i for i, start in enumerate(ordered)), default=0
    )


def slot_starts(slots: UploadSlots, seconds: float) -> list[float]:
    starts: list[float] = []
    now = 0.0
    while True:
        slot = slots.reserve(now)
        assert slot is not None
        if slot.start > seconds:
            return starts
        starts.append(slot.start)
        now = slot.start


@given(
    partitions=st.integers(min_value=1, max_value=24),
    replicas=st.integers(min_value=1, max_value=6),
    shifts=st.lists(st.floats(min_value=-LATE, max_value=LATE), min_size=200, max_size=200),
)
def test_the_group_never_has_more_than_the_limit_in_any_second(
    partitions: int, replicas: int, shifts: list[float]
) -> None:
    # Partitions dealt round-robin; every request written anywhere within the lateness
    # allowed around its slot's start.
    sent: list[float] = []
    for replica in range(replicas):
        slots = UploadSlots(RATE, MARGIN, LATE)
        slots.share(range(replica, partitions, replicas), partitions)
        if not slots.fraction:
            assert slots.reserve(0.0) is None
            continue
        sent += [start + shifts[n % len(shifts)] for n, start in enumerate(slot_starts(slots, 5))]
    assert most_in_any_second(sent) <= RATE


@given(partitions=st.integers(min_value=1, max_value=24))
def test_a_replica_owning_every_partition_gets_every_slot(partitions: int) -> None:
    slots = UploadSlots(RATE, MARGIN, LATE)
    slots.share(range(partitions), partitions)
    starts = slot_starts(slots, 10)
    assert len(starts) >= 10 * RATE / (1 + MARGIN) - 1
    assert slots.fraction == 1.0


def test_shares_follow_the_partitions_owned() -> None:
    slots = [UploadSlots(RATE, MARGIN, LATE) for _ in range(3)]
    for slot, owned in zip(slots, ([0, 1, 2, 3], [4], [5]), strict=True):
        slot.share(owned, 6)
    counts = [len(slot_starts(s, 60)) for s in slots]
    assert sum(s.fraction for s in slots) == pytest.approx(1.0)
    assert counts[0] == pytest.approx(4 * counts[1], rel=0.01)
    assert counts[1] == pytest.approx(counts[2], rel=0.01)


def test_a_slot_is_not_used_late_or_after_its_partition_moved() -> None:
    slots = UploadSlots(RATE, MARGIN, LATE)
    slots.share([0, 1], 2)
    slot = slots.reserve(100.0)
    assert slot is not None
    assert slots.usable(slot, slot.start + LATE / 2)
    assert not slots.usable(slot, slot.start + 2 * LATE), "a late request may crowd the next"
    slots.share([1 - slot.index % 2], 2)
    assert not slots.usable(slot, slot.start), "the slot's partition moved to another replica"


def test_two_reservations_never_share_a_slot() -> None:
    slots = UploadSlots(RATE, MARGIN, LATE)
    first, second = slots.reserve(5.0), slots.reserve(5.0)
    assert first is not None
    assert second is not None
    assert second.index == first.index + 1


def test_invalid_slot_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="late <= margin"):
        UploadSlots(RATE, 0.01, 0.02)


async def test_uploads_wait_for_an_assignment_when_the_replica_owns_no_input() -> None:
    limits = RateLimits(RATE, 3000)
    limits.assigned(INPUT, [], 6)
    waiting = asyncio.create_task(limits.acquire(is_upload=True))
    await asyncio.sleep(0.2)
    assert not waiting.done(), "a replica without input partitions must not upload"
    limits.assigned(INPUT, [0], 6)
    # Its turn comes after the settle period (1.03 s) and within one round of the slots
    # (1 s); the rest is room for a busy machine, not a figure under test.
    await asyncio.wait_for(waiting, 5)


def test_the_minute_limit_is_divided_over_input_and_ledger_partitions() -> None:
    limits = RateLimits(RATE, 3000)
    limits.assigned(INPUT, [0, 1], 6)
    limits.assigned(LEDGER, [0, 1, 2], 6)
    assert limits.overall_limit == 3000 * 5 // 12
    limits.assigned(INPUT, [], 6)
    limits.assigned(LEDGER, [], 6)
    assert limits.overall_limit == 1, "one request is always allowed (the token check)"
