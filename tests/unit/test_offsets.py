"""Guarantee 1 in the pure core: the committed offset never passes an unaccounted event,
and offsets done above it are carried in the commit metadata (guarantee 3)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from service.core.offsets import (
    MAX_METADATA_CHARS,
    DoneOffsets,
    OffsetTracker,
    PartitionOffsets,
    decode_done,
    encode_done,
)


def test_committable_is_the_lowest_unaccounted_offset() -> None:
    offsets = PartitionOffsets()
    assert offsets.committable() is None
    for offset in (10, 11, 12, 13):
        offsets.received(offset)
    assert offsets.committable() == 10
    offsets.accounted(12)
    offsets.accounted(11)
    assert offsets.committable() == 10
    offsets.accounted(10)
    assert offsets.committable() == 13
    offsets.accounted(13)
    assert offsets.committable() == 14


def test_gaps_in_offsets_do_not_block() -> None:
    """Transaction markers and compaction leave holes; only received offsets count."""
    offsets = PartitionOffsets()
    offsets.received(5)
    offsets.received(9)
    offsets.accounted(5)
    assert offsets.committable() == 9
    offsets.accounted(9)
    assert offsets.committable() == 10


def test_checkpoint_carries_done_offsets_above_the_hole() -> None:
    offsets = PartitionOffsets()
    for offset in range(6):
        offsets.received(offset)
    for offset in (2, 3, 5):
        offsets.accounted(offset)
    assert offsets.checkpoint() == (0, "scm-relay:1:2-3,5")
    assert offsets.checkpoint() is None  # nothing changed
    offsets.accounted(0)
    offsets.accounted(1)
    assert offsets.checkpoint() == (4, "scm-relay:1:5")
    offsets.accounted(4)
    assert offsets.checkpoint() == (6, "")


def test_a_new_owner_skips_what_the_metadata_says_is_done() -> None:
    first = PartitionOffsets()
    for offset in range(4):
        first.received(offset)
    first.accounted(2)
    first.accounted(3)
    point = first.checkpoint()
    assert point is not None
    offset, metadata = point
    assert offset == 0
    second = PartitionOffsets()
    second.restore(0, metadata)
    assert [second.received(o) for o in range(5)] == [False, False, True, True, False]
    second.accounted(0)
    # Before 1 is done, a further commit still carries 2 and 3.
    assert second.checkpoint() == (1, "scm-relay:1:2-3")
    second.accounted(1)
    second.accounted(4)
    assert second.checkpoint() == (5, "")


def test_tracker_reports_changed_partitions_once() -> None:
    tracker = OffsetTracker()
    tracker.received("t", 0, 0)
    tracker.received("t", 1, 7)
    assert tracker.checkpoints() == {("t", 0): (0, ""), ("t", 1): (7, "")}
    assert tracker.checkpoints() == {}
    tracker.accounted("t", 0, 0)
    assert tracker.checkpoints() == {("t", 0): (1, "")}
    tracker.keep_only({("t", 1)})
    tracker.accounted("t", 0, 1)  # a partition now owned elsewhere: ignored
    assert tracker.checkpoints() == {}
    assert tracker.unaccounted == 1


def test_in_flight_offsets_are_skipped_when_read_again() -> None:
    offsets = PartitionOffsets()
    # Assigned again from commit point 0 while the upload of offset 1 is under way.
    offsets.restore(0, None)
    offsets.hold_in_flight(1)
    # The partition is read again from offset 0 after a rebalance.
    assert [offsets.received(o) for o in range(3)] == [False, True, False]
    assert offsets.committable() == 0
    offsets.accounted(1)  # the upload ended
    offsets.accounted(0)
    offsets.accounted(2)
    assert offsets.checkpoint() == (3, "")


@given(st.sets(st.integers(0, 10**9), max_size=300))
def test_metadata_round_trips_or_keeps_the_lowest_ranges(done: set[int]) -> None:
    metadata = encode_done(sorted(done))
    assert len(metadata) <= MAX_METADATA_CHARS
    decoded = decode_done(metadata)
    assert decoded <= done
    if decoded != done:
        assert max(decoded, default=-1) < min(done - decoded)


@given(st.lists(st.tuples(st.integers(0, 5000), st.integers(0, 300)), max_size=40))
def test_runs_of_any_length_round_trip(runs: list[tuple[int, int]]) -> None:
    done = {offset for start, length in runs for offset in range(start, start + length)}
    metadata = encode_done(sorted(done))
    assert decode_done(metadata) == done  # at most 40 ranges: they always fit
    assert metadata.count(",") + 1 == (len([o for o in done if o - 1 not in done]) if done else 1)


def test_done_offsets_come_in_order_and_forget_what_the_commit_point_passed() -> None:
    done = DoneOffsets()
    done.update([30, 10, 20])
    assert done.from_(0) == [10, 20, 30]
    done.add(15)
    done.add(5)
    assert done.from_(12) == [15, 20, 30]
    assert [offset in done for offset in (5, 10, 15, 20, 30)] == [False, False, True, True, True]
    assert done.from_(0) == [15, 20, 30]  # forgotten offsets do not come back


def test_unreadable_metadata_means_nothing_done() -> None:
    assert decode_done("") == set()
    assert decode_done("someone-else:7") == set()
    assert decode_done("scm-relay:1:x-y") == set()


@given(
    st.integers(1, 60),
    st.lists(st.tuples(st.sampled_from(["account", "commit"]), st.integers(0, 59)), max_size=200),
)
def test_committed_offset_never_passes_an_unaccounted_event(
    count: int, steps: list[tuple[str, int]]
) -> None:
    """Random interleavings of reads, out-of-order accounting (batches finishing in any
    order, failures that never account) and commits; then a new owner resumes from the
    last commit and must see every unaccounted event again."""
    offsets = PartitionOffsets()
    accounted: set[int] = set()
    received = 0
    commits: list[tuple[int, str]] = []
    for action, value in steps:
        if received < count:
            offsets.received(received)
            received += 1
        if action == "account" and value < received:
            offsets.accounted(value)
            accounted.add(value)
        else:
            point = offsets.checkpoint()
            if point is not None:
                commits.append(point)
    for offset, metadata in commits:
        done_above = decode_done(metadata)
        assert all(o in accounted for o in range(offset)), offset
        assert done_above <= accounted
    assert [c[0] for c in commits] == sorted(c[0] for c in commits)
    if commits:
        offset, metadata = commits[-1]
        resumed = PartitionOffsets()
        resumed.restore(offset, metadata)
        redelivered = [o for o in range(offset, received) if not resumed.received(o)]
        unaccounted_then = [o for o in range(received) if o not in accounted]
        assert set(unaccounted_then) <= set(redelivered) | set(range(offset))
        assert not set(unaccounted_then) & set(range(offset))


def test_the_commit_point_passes_transaction_markers_after_the_last_record() -> None:
    offsets = PartitionOffsets()
    for offset in (0, 1, 2):
        offsets.received(offset)
    offsets.accounted(0)
    offsets.accounted(2)
    # Offset 3 is a transaction's commit marker: the consumer stands at 4.
    assert not offsets.read_to(4), "an event still pending must hold the commit point"
    assert offsets.checkpoint() == (1, "scm-relay:1:2")
    offsets.accounted(1)
    assert offsets.checkpoint() == (4, "")
    assert not offsets.read_to(4)
    assert not offsets.read_to(3), "a position below the last one read moves nothing"


def test_markers_pass_from_the_restored_commit_point_and_never_without_one() -> None:
    fresh = PartitionOffsets()
    assert not fresh.read_to(5)
    assert fresh.checkpoint() is None
    restored = PartitionOffsets()
    restored.restore(10, None)
    assert not restored.read_to(10)
    assert restored.read_to(12)
    assert restored.checkpoint() == (12, "")
    restored.received(12)
    assert restored.checkpoint() is None  # 12 pending: nothing new to commit
    restored.accounted(12)
    assert restored.checkpoint() == (13, "")
