"""Server tasks: what an accepted upload becomes, its states (pending, in-progress,
complete or failed) and the account's book of them."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any, Final

from devkit.simulator.clock import now_iso

SIMULATED_USER_ID: Final = 1638
MAX_TASKS_KEPT: Final = 200_000


@dataclass
class Task:
    """A server task and the request it carries."""

    id: str
    reference: str
    constraints: dict[str, list[str]]
    scm_data: dict[str, str]
    campaign: int | None
    created_at: str
    state: str = "pending"
    started_at: str | None = None
    completed_at: str | None = None
    codes_affected: int | None = None
    error: str | None = None

    def start(self) -> None:
        """pending -> in-progress."""
        self.state = "in-progress"
        self.started_at = now_iso()

    def complete(self, codes_affected: int) -> None:
        """-> complete, having changed `codes_affected` codes."""
        self.codes_affected = codes_affected
        self.state = "complete"
        self.completed_at = now_iso()

    def fail(self, error: str) -> None:
        """-> failed, having changed no code."""
        self.state = "failed"
        self.codes_affected = 0
        self.error = error
        self.completed_at = now_iso()

    def view(self, *, details: bool) -> dict[str, Any]:
        """The task as the API shows it (with `details` in the single-task view)."""
        body: dict[str, Any] = {
            "id": self.id,
            "state": self.state,
            "reference": self.reference,
            "codes_affected": self.codes_affected,
            "created_by": SIMULATED_USER_ID,
            "created_at": self.created_at,
            "started_at": self.started_at,
            "completed_at": self.completed_at,
        }
        if self.error is not None:
            body["error"] = self.error
        if details:
            # The vendor's example shows one value as a string ("rfid": "test_rfid");
            # several are shown as a list (an assumption: the vendor shows no such task).
            shown = {
                key: values[0] if len(values) == 1 else list(values)
                for key, values in self.constraints.items()
            }
            body["details"] = {"constraints": shown, "scm_data": dict(self.scm_data)}
        return body


class TaskBook:
    """The account's tasks by id, the oldest finished ones dropped past MAX_TASKS_KEPT."""

    def __init__(self) -> None:
        self.tasks: dict[str, Task] = {}
        self._order: deque[str] = deque()

    def keep(self, task: Task) -> None:
        """Keep an accepted task."""
        self.tasks[task.id] = task
        self._order.append(task.id)
        while len(self._order) > MAX_TASKS_KEPT:
            oldest = self._order.popleft()
            if self.tasks[oldest].state in ("complete", "failed"):
                del self.tasks[oldest]
            else:
                self._order.append(oldest)
                break
