"""When to ask the API about each unfinished task: soon at first, then less often.

Tasks are asked about in rounds, each one bulk status request per `round_size`
tasks. A round starts when `round_size` tasks are due, or when the earliest due
task has waited `gather_s` past its time; it then takes every task due within
`gather_s` from now, early ones included. So a steady stream of tasks costs one
request per `gather_s` or per `round_size` tasks, not one per task, at the price of
a result up to `gather_s` later.

Pure: the poller feeds it task ids and the time, and asks which are due.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Final

MAX_DUE_PER_ROUND: Final = 1000


@dataclass
class _Entry:
    due_at: float
    interval: float
    added_at: float
    finishing: bool = False
    reported_stuck: bool = False


class PollSchedule:
    """Per-task next poll time with geometric backoff between `initial_s` and `max_s`."""

    def __init__(
        self,
        *,
        initial_s: float,
        factor: float,
        max_s: float,
        stuck_after_s: float = 900.0,
        gather_s: float = 0.0,
        round_size: int = 1,
    ) -> None:
        if initial_s <= 0 or factor < 1 or max_s < initial_s:
            raise ValueError("need initial_s > 0, factor >= 1 and max_s >= initial_s")
        if gather_s < 0 or round_size < 1:
            raise ValueError("need gather_s >= 0 and round_size >= 1")
        self.gather_s = gather_s
        self.round_size = round_size
        self.initial_s = initial_s
        self.factor = factor
        self.max_s = max_s
        self.stuck_after_s = stuck_after_s
        self._entries: dict[str, _Entry] = {}
        self._heap: list[tuple[float, str]] = []

    def add(self, task_id: str, now: float, age_s: float = 0.0) -> None:
        """Start following a task submitted `age_s` ago; its first check is `initial_s` from
        now."""
        if task_id in self._entries:
            return
        entry = _Entry(due_at=now + self.initial_s, interval=self.initial_s, added_at=now - age_s)
        self._entries[task_id] = entry
        heapq.heappush(self._heap, (entry.due_at, task_id))

    def due(self, now: float, limit: int = MAX_DUE_PER_ROUND) -> list[str]:
        """The task ids of the round that starts at `now`, earliest first, at most `limit`
        (none when no round starts yet); each is taken off the schedule until `polled` or
        `remove` is called for it."""
        taken: list[tuple[float, str]] = []
        horizon = now + self.gather_s
        while self._heap and self._heap[0][0] <= horizon and len(taken) < limit:
            due_at, task_id = heapq.heappop(self._heap)
            entry = self._entries.get(task_id)
            if entry is None or entry.finishing or entry.due_at != due_at:
                continue  # removed, finishing, or rescheduled since
            taken.append((due_at, task_id))
        due_now = sum(1 for due_at, _ in taken if due_at <= now)
        starts = due_now >= min(self.round_size, limit) or (
            bool(taken) and taken[0][0] <= now - self.gather_s
        )
        if not starts:
            for item in taken:
                heapq.heappush(self._heap, item)
            return []
        return [task_id for _, task_id in taken]

    def polled(self, task_id: str, now: float) -> None:
        """The task is still unfinished (or its status unknown): check again later."""
        entry = self._entries.get(task_id)
        if entry is None:
            return
        entry.interval = min(self.max_s, entry.interval * self.factor)
        entry.due_at = now + entry.interval
        heapq.heappush(self._heap, (entry.due_at, task_id))

    def newly_stuck(self, task_id: str, now: float) -> bool:
        """True once, when the task has been unfinished for `stuck_after_s`."""
        entry = self._entries.get(task_id)
        if entry is None or entry.reported_stuck or now - entry.added_at < self.stuck_after_s:
            return False
        entry.reported_stuck = True
        return True

    def age(self, task_id: str, now: float) -> float:
        """Seconds since the task was submitted (as far as the schedule knows)."""
        entry = self._entries.get(task_id)
        return 0.0 if entry is None else now - entry.added_at

    @property
    def stuck(self) -> int:
        """Tasks reported stuck and still followed."""
        return sum(entry.reported_stuck for entry in self._entries.values())

    def oldest_age(self, now: float) -> float:
        """Age of the oldest followed task, 0 when none."""
        return max((now - entry.added_at for entry in self._entries.values()), default=0.0)

    def finishing(self, task_id: str) -> None:
        """The task ended and its result is being published: stop checking it."""
        entry = self._entries.get(task_id)
        if entry is not None:
            entry.finishing = True

    def remove(self, task_id: str) -> None:
        """Forget a task (published, tombstoned, or its partition revoked)."""
        self._entries.pop(task_id, None)

    def __len__(self) -> int:
        return len(self._entries)
