"""What a failing history looks like, for people reading a run: which known window of
the relay it resembles. A diagnosis from the world's internals (the relay's own log
lines, the broker's commit metadata); the verdict itself is the oracle's alone."""

from __future__ import annotations

import re

from sim.oracle import Verdict
from sim.world import World

# The relay keeps its commit metadata under 3 500 characters: near that, ranges were cut.
METADATA_NEAR_CUT = 3300
_WRITE = re.compile(r"^writes: code (\S+) field (\S+):")
_RECORDED = re.compile(
    r"(?:batch_submitted|batch_created_several_tasks) batch_id=(\S+) .*?task_ids?=(.*)"
)
_TASK_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


_FOUND_NONE = re.compile(
    r"^\s*(\S+) \S+ batch_reconciled batch_id=(\S+) .*task_ids=\[\] reference=(.*)$"
)


def _lookups_within_the_lag(world: World, recorded: dict[str, set[str]]) -> bool:
    """Whether a lookup found nothing while a task with its reference that no other batch
    recorded existed but was not listed yet (the vendor's list lags behind creation)."""
    for line in world.history:
        match = _FOUND_NONE.match(line)
        if not match:
            continue
        at, batch_id, reference = float(match.group(1)), match.group(2), match.group(3)
        for task in world.vendor.tasks.values():
            if (
                task.reference == reference
                and task.created <= at < task.visible_from
                and recorded.get(task.id, {batch_id}) == {batch_id}
            ):
                return True
    return False


def _batches_by_task(history: list[str]) -> dict[str, set[str]]:
    """Which batches recorded each task, from the relay's `batch_submitted` and
    `batch_created_several_tasks` lines."""
    batches: dict[str, set[str]] = {}
    for line in history:
        match = _RECORDED.search(line)
        if match:
            for task_id in _TASK_ID.findall(match.group(2)):
                batches.setdefault(task_id, set()).add(match.group(1))
    return batches


def classify(verdict: Verdict, world: World) -> list[str]:
    """The known windows this history shows (several may apply), else 'other'."""
    kinds: list[str] = []
    history = "\n".join(world.history)
    batch_max = world.scenario.config.batching.batch_max_values
    split_codes = {
        code
        for record, _offset in world.published
        if record.valid and len(record.codes) > batch_max
        for code in record.codes
    }
    written = [m.group(1) for v in verdict.violations if (m := _WRITE.match(v))]
    if written and any(code in split_codes for code in written):
        kinds.append("event split across batches sent again")
    if written and world.broker.max_metadata >= METADATA_NEAR_CUT:
        kinds.append("done offsets beyond the commit metadata")
    recorded = _batches_by_task(world.history)
    if any(len(batches) > 1 for batches in recorded.values()):
        kinds.append("a shared reference adopted another task")
    if "batch_created_several_tasks" in history or _lookups_within_the_lag(world, recorded):
        # A lookup ran before the list showed a task the batch's earlier attempt created
        # (the list's read-after-write lag), so the batch went again.
        kinds.append("a lookup missed the batch's own task")
    if any(
        v.startswith("tasks:") and ("recorded 2" in v or "has 2 results" in v)
        for v in verdict.violations
    ):
        kinds.append("a task recorded or reported twice")
    if "relay_fenced" in history and any(
        v.startswith(("writes:", "tasks:", "dead letters:")) for v in verdict.violations
    ):
        kinds.append("a replica whose partitions moved raced their new owner")
    if any(v.startswith("dead letters:") for v in verdict.violations):
        kinds.append("dead letters")
    if any(v.startswith("writes:") and "published [" in v for v in verdict.violations):
        kinds.append("order or lost change")
    if any(v.startswith("progress:") for v in verdict.violations):
        kinds.append("no progress")
    if any(v.startswith("crash:") for v in verdict.violations):
        kinds.append("crash")
    return kinds or ["other"]
