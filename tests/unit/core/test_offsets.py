"""Guarantee 1 in the pure core: the committed offset never passes an unaccounted event;
and guarantee 3: what is done above it travels whole in the partition's progress
record, however scattered, and values of an event cut across batches are never sent
again once recorded."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from service.core.offsets import (
    METADATA_PREFIX,
    Checkpoint,
    DoneOffsets,
    OffsetTracker,
    PartitionOffsets,
    Progress,
    decode_done,
    decode_progress,
    encode_progress,
    progress_digest,
)


def progress_of(point: Checkpoint | None) -> Progress:
    assert point is not None
    assert point.progress is not None
    assert point.metadata == METADATA_PREFIX + progress_digest(point.progress)
    return decode_progress(point.progress)


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
    assert progress_of(offsets.checkpoint("t", 0)) == Progress(0, (2, 3, 5), {})
    assert offsets.checkpoint("t", 0) is None  # nothing changed
    offsets.accounted(0)
    offsets.accounted(1)
    assert progress_of(offsets.checkpoint("t", 0)) == Progress(4, (5,), {})
    offsets.accounted(4)
    point = offsets.checkpoint("t", 0)
    assert point is not None
    assert point.offset == 6
    assert progress_of(point) == Progress(6, (), {})


def test_scattered_done_offsets_are_never_cut() -> None:
    """Issue 27, window 2: the metadata kept at most 3 500 characters of ranges; 1 000
    alternating done offsets lost 192 of them, 8-digit offsets more than half. The
    progress record keeps every one."""
    base = 12_345_678
    offsets = PartitionOffsets()
    offsets.restore(base, None)
    offsets.apply(None)  # no progress record: a partition never read before
    for offset in range(base, base + 20_000):
        offsets.received(offset)
    done = list(range(base + 1, base + 20_000, 2))  # every other one: 10 000 runs
    for offset in done:
        offsets.accounted(offset)
    point = offsets.checkpoint("t", 0)
    assert progress_of(point).done == tuple(done)
    assert point is not None
    assert point.progress is not None
    assert len(point.progress) < 32 * 1024, "a bitmap, not a list of numbers"
    # A new owner restores the commit point, then applies the record: it skips each one.
    resumed = PartitionOffsets()
    resumed.restore(point.offset, point.metadata)
    resumed.apply(decode_progress(point.progress))
    skipped = [o for o in range(base, base + 20_000) if resumed.received(o)]
    assert skipped == done


def test_a_new_owner_skips_what_the_progress_record_says_is_done() -> None:
    first = PartitionOffsets()
    for offset in range(4):
        first.received(offset)
    first.accounted(1)
    first.accounted(3)
    point = first.checkpoint("t", 0)
    assert point is not None
    assert point.progress is not None
    second = PartitionOffsets()
    second.restore(point.offset, point.metadata)
    second.apply(decode_progress(point.progress))
    # The partition is read again from offset 0 after a rebalance.
    assert [second.received(o) for o in range(4)] == [False, True, False, True]
    assert second.committable() == 0
    second.accounted(0)
    second.accounted(2)
    assert progress_of(second.checkpoint("t", 0)) == Progress(4, (), {})


def test_events_done_before_move_the_commit_point_when_read_again() -> None:
    """Found by the simulation: every event above the commit point was done (the
    progress record said so) and read again, yet no checkpoint followed, and the
    partition's commit stayed behind its end for ever."""
    record = encode_progress("t", 0, Progress(9, (9, 10, 11, 12), {}))
    second = PartitionOffsets()
    second.restore(9, METADATA_PREFIX + progress_digest(record))
    second.apply(decode_progress(record))
    assert second.checkpoint("t", 0) is None, "nothing moved yet: the same commit"
    assert [second.received(o) for o in range(9, 13)] == [True] * 4
    assert progress_of(second.checkpoint("t", 0)) == Progress(13, (), {})


def test_values_of_an_event_cut_across_batches_are_done_one_batch_at_a_time() -> None:
    """Issue 27, window 1: an event's first batch recorded, the second not yet: a new
    owner must send only the second batch's values."""
    offsets = PartitionOffsets()
    for offset in range(3):
        offsets.received(offset)
    offsets.values_in_flight(1, 5, [0, 1, 2])
    offsets.values_in_flight(1, 5, [3, 4])
    assert offsets.excluded(1) == frozenset(range(5))
    offsets.values_done(1, 5, [0, 1, 2])  # the first batch is recorded
    offsets.accounted(0)
    offsets.accounted(2)
    progress = progress_of(offsets.checkpoint("t", 0))
    assert progress == Progress(1, (2,), {1: (5, (0, 1, 2))})
    # The second batch was dropped (a rebalance): its values are to send again, only them.
    offsets.values_forgotten(1, [3, 4])
    assert offsets.excluded(1) == frozenset({0, 1, 2})
    # Taken over by a new owner: the record says the same.
    resumed = PartitionOffsets()
    resumed.restore(progress.commit, None)
    resumed.apply(progress)
    assert not resumed.received(1)
    assert resumed.excluded(1) == frozenset({0, 1, 2})
    resumed.values_done(1, 5, [3, 4])
    assert resumed.is_done(1)
    assert resumed.committable() == 2


def test_values_done_for_an_event_not_read_yet_make_it_skipped() -> None:
    offsets = PartitionOffsets()
    offsets.restore(0, None)
    offsets.values_done(4, 2, [0, 1])  # an intent closed elsewhere carried it whole
    offsets.values_done(6, 3, [1])  # ...and one value of another
    assert [offsets.received(o) for o in range(7)] == [False] * 4 + [True, False, False]
    assert offsets.excluded(6) == frozenset({1})


def test_an_older_relays_metadata_still_says_what_is_done() -> None:
    assert decode_done("scm-relay:1:2-3,5") == {2, 3, 5}
    assert decode_done("") == set()
    assert decode_done("someone-else:7") == set()
    assert decode_done("scm-relay:1:x-y") == set()
    offsets = PartitionOffsets()
    offsets.restore(0, "scm-relay:1:2-3")
    assert [offsets.received(o) for o in range(4)] == [False, False, True, True]


def test_a_progress_record_round_trips() -> None:
    progress = Progress(10**10, (10**10 + 3, 10**10 + 70_000), {10**10 + 5: (1000, (0, 999))})
    raw = encode_progress("scm.changes", 3, progress)
    assert decode_progress(raw) == progress
    assert progress_digest(raw) == progress_digest(encode_progress("scm.changes", 3, progress))


def test_tracker_checkpoints_only_partitions_whose_progress_moved() -> None:
    tracker = OffsetTracker()
    tracker.received("t", 0, 0)
    tracker.received("t", 1, 6)
    tracker.accounted("t", 1, 6)
    moved = tracker.checkpoints()
    assert {key: point.offset for key, point in moved.items()} == {("t", 0): 0, ("t", 1): 7}
    assert tracker.checkpoints() == {}
    tracker.accounted("t", 0, 0)
    assert {key: point.offset for key, point in tracker.checkpoints().items()} == {("t", 0): 1}
    assert tracker.checkpoints() == {}


def test_an_in_flight_event_holds_the_commit_point_and_is_skipped() -> None:
    offsets = PartitionOffsets()
    offsets.restore(0, None)
    offsets.mark_in_flight(1)
    assert [offsets.received(o) for o in range(3)] == [False, True, False]
    offsets.accounted(0)
    offsets.accounted(2)
    assert offsets.committable() == 1
    offsets.accounted(1)
    assert offsets.committable() == 3


def test_done_offsets_come_in_order_and_forget_what_the_commit_point_passed() -> None:
    done = DoneOffsets()
    done.update([30, 10, 20])
    assert done.from_(0) == [10, 20, 30]
    done.add(15)
    done.add(5)
    assert done.from_(12) == [15, 20, 30]
    assert [offset in done for offset in (5, 10, 15, 20, 30)] == [False, False, True, True, True]
    assert done.from_(0) == [15, 20, 30]  # forgotten offsets do not come back


@given(
    st.integers(1, 60),
    st.lists(st.tuples(st.sampled_from(["account", "commit"]), st.integers(0, 59)), max_size=200),
)
def test_committed_offset_never_passes_an_unaccounted_event(
    count: int, steps: list[tuple[str, int]]
) -> None:
    """Random interleavings of reads, out-of-order accounting (batches finishing in any
    order, failures that never account) and commits; then a new owner resumes from the
    last commit and its progress record and must see every unaccounted event again, and
    none of the accounted ones."""
    offsets = PartitionOffsets()
    accounted: set[int] = set()
    received = 0
    commits: list[Checkpoint] = []
    for action, value in steps:
        if received < count:
            offsets.received(received)
            received += 1
        if action == "account" and value < received:
            offsets.accounted(value)
            accounted.add(value)
        else:
            point = offsets.checkpoint("t", 0)
            if point is not None:
                commits.append(point)
    for point in commits:
        progress = progress_of(point)
        assert all(o in accounted for o in range(point.offset)), point.offset
        assert set(progress.done) <= accounted
    assert [c.offset for c in commits] == sorted(c.offset for c in commits)
    if commits:
        last = commits[-1]
        resumed = PartitionOffsets()
        resumed.restore(last.offset, last.metadata)
        resumed.apply(progress_of(last))
        redelivered = [o for o in range(last.offset, received) if not resumed.received(o)]
        unaccounted_then = [o for o in range(received) if o not in accounted]
        assert set(unaccounted_then) <= set(redelivered) | set(range(last.offset))
        assert not set(unaccounted_then) & set(range(last.offset))
        accounted_at_last = set(progress_of(last).done)
        assert not accounted_at_last & set(redelivered)


def test_the_commit_point_passes_transaction_markers_after_the_last_record() -> None:
    offsets = PartitionOffsets()
    for offset in (0, 1, 2):
        offsets.received(offset)
    offsets.accounted(0)
    offsets.accounted(2)
    # Offset 3 is a transaction's commit marker: the consumer stands at 4.
    assert not offsets.read_to(4), "an event still pending must hold the commit point"
    assert progress_of(offsets.checkpoint("t", 0)) == Progress(1, (2,), {})
    offsets.accounted(1)
    assert progress_of(offsets.checkpoint("t", 0)).commit == 4
    assert not offsets.read_to(4)
    assert not offsets.read_to(3), "a position below the last one read moves nothing"


def test_markers_pass_from_the_restored_commit_point_and_never_without_one() -> None:
    fresh = PartitionOffsets()
    assert not fresh.read_to(5)
    assert fresh.checkpoint("t", 0) is None
    restored = PartitionOffsets()
    restored.restore(10, None)
    assert restored.read_to(12)
    assert restored.checkpoint("t", 0) is None, "a checkpoint before the progress record"
    restored.apply(None)
    assert not restored.read_to(10)
    assert progress_of(restored.checkpoint("t", 0)).commit == 12
    restored.received(12)
    assert restored.checkpoint("t", 0) is None  # 12 pending: nothing new to commit
    restored.accounted(12)
    assert progress_of(restored.checkpoint("t", 0)).commit == 13


def test_no_checkpoint_forgets_what_the_previous_owner_had_done() -> None:
    """Found by the simulation: a partition restored from its commit point wrote a
    progress record before it had read the previous owner's (a fence commit came
    first): the record it wrote said nothing was done, and an event dead-lettered
    before was dead-lettered again."""
    resumed = PartitionOffsets()
    resumed.restore(21, "scm-relay:2:0123456789abcdef")
    resumed.read_to(21)
    assert resumed.checkpoint("t", 1) is None
    resumed.apply(Progress(21, (22, 25, 28), {}))
    assert progress_of(resumed.checkpoint("t", 1)) == Progress(21, (22, 25, 28), {})


def test_an_upload_under_way_does_not_carry_the_commit_point_past_what_is_unread() -> None:
    """Found by the simulation: taken back with an upload of offset 9 still under way,
    the partition's commit point jumped to 10 once it was recorded, past offsets 6 to 8
    not read again yet; read later, they were taken for new events and sent again."""
    offsets = PartitionOffsets()
    offsets.restore(6, None)
    offsets.apply(None)
    offsets.mark_in_flight(9)
    offsets.accounted(9)
    assert offsets.committable() == 6
    assert [offsets.received(o) for o in (6, 7, 8, 9)] == [False, False, False, True]
    for offset in (6, 7, 8):
        offsets.accounted(offset)
    assert offsets.committable() == 10
