"""The poll schedule: per-task backoff, and rounds that gather tasks into one request."""

from __future__ import annotations

import pytest

from service.core.polling import PollSchedule


def schedule(**overrides: float) -> PollSchedule:
    values: dict[str, float] = {"initial_s": 1.0, "factor": 2.0, "max_s": 8.0}
    values.update(overrides)
    return PollSchedule(**values)  # type: ignore[arg-type]


def test_a_task_is_first_due_after_the_initial_wait_then_backs_off_to_the_cap() -> None:
    s = schedule()
    s.add("t", 0.0)
    assert s.due(0.9) == []
    assert s.due(1.0) == ["t"]
    times = []
    now = 1.0
    for _ in range(5):
        s.polled("t", now)
        while not s.due(now):
            now += 0.5
        times.append(now)
    assert times == [3.0, 7.0, 15.0, 23.0, 31.0]  # +2, +4, +8, then capped at 8


def test_without_gathering_every_due_task_is_a_round_of_its_own() -> None:
    s = schedule()
    s.add("a", 0.0)
    s.add("b", 0.5)
    assert s.due(1.0) == ["a"]
    assert s.due(1.5) == ["b"]


def test_a_round_waits_to_gather_and_takes_tasks_due_soon() -> None:
    s = schedule(gather_s=1.0, round_size=100)
    for n in range(5):
        s.add(f"t{n}", n * 0.4)  # due at 1.0, 1.4, 1.8, 2.2, 2.6
    # Due, but neither a full round nor overdue by gather_s: wait for more.
    assert s.due(1.0) == []
    assert s.due(1.9) == []
    # The first has waited gather_s past its time: one round takes all due before 3.0.
    assert s.due(2.0) == ["t0", "t1", "t2", "t3", "t4"]
    assert s.due(10.0) == []


def test_a_full_round_starts_at_once() -> None:
    s = schedule(gather_s=5.0, round_size=3)
    for n in range(4):
        s.add(f"t{n}", 0.0)
    assert s.due(1.0) == ["t0", "t1", "t2", "t3"]


def test_finished_and_removed_tasks_are_never_due() -> None:
    s = schedule(gather_s=0.5)
    s.add("done", 0.0)
    s.add("gone", 0.0)
    s.add("open", 0.0)
    s.finishing("done")
    s.remove("gone")
    assert s.due(2.0) == ["open"]
    assert len(s) == 2


def test_stuck_is_reported_once() -> None:
    s = schedule(stuck_after_s=10.0)
    s.add("t", 0.0)
    assert not s.newly_stuck("t", 9.0)
    assert s.newly_stuck("t", 10.0)
    assert not s.newly_stuck("t", 11.0)
    assert s.stuck == 1


@pytest.mark.parametrize(
    "bad", [{"initial_s": 0.0}, {"factor": 0.5}, {"max_s": 0.5}, {"gather_s": -1.0}]
)
def test_nonsense_parameters_are_refused(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="need"):
        schedule(**bad)
