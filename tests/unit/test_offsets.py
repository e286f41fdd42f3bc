"""Guarantee 1 in the pure core: the committed offset never passes an unaccounted event."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from service.core.offsets import OffsetTracker, PartitionOffsets


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


def test_advance_reports_each_new_offset_once() -> None:
    tracker = OffsetTracker()
    tracker.received("t", 0, 0)
    tracker.received("t", 1, 7)
    assert tracker.advances() == {("t", 0): 0, ("t", 1): 7}
    assert tracker.advances() == {}
    tracker.accounted("t", 0, 0)
    assert tracker.advances() == {("t", 0): 1}
    tracker.forget({("t", 0)})
    tracker.accounted("t", 0, 1)  # a revoked partition: ignored
    assert tracker.advances() == {}
    assert tracker.unaccounted == 1


@given(
    st.integers(1, 60),
    st.lists(st.tuples(st.sampled_from(["account", "commit"]), st.integers(0, 59)), max_size=200),
    st.randoms(use_true_random=False),
)
def test_committed_offset_never_passes_an_unaccounted_event(
    count: int, steps: list[tuple[str, int]], rng: object
) -> None:
    """Random interleavings of reads, out-of-order accounting (batches finishing in any
    order, failures that never account) and commits."""
    offsets = PartitionOffsets()
    accounted: set[int] = set()
    received = 0
    commits: list[int] = []
    for action, value in steps:
        if received < count:
            offsets.received(received)
            received += 1
        if action == "account" and value < received:
            offsets.accounted(value)
            accounted.add(value)
        else:
            moved = offsets.advance()
            if moved is not None:
                commits.append(moved)
    for commit in commits:
        assert all(offset in accounted for offset in range(commit)), commit
    assert commits == sorted(commits)
    expected = next((o for o in range(received) if o not in accounted), received)
    assert offsets.committable() == (expected if received else None)
