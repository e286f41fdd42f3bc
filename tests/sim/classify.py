"""What a failing history looks like, for people reading a run: which known window of
the relay it resembles. A diagnosis from the world's internals (the relay's own log
lines, the broker's commit metadata); the verdict itself is the oracle's alone."""

from __future__ import annotations

import re

from tests.sim.oracle import Verdict
from tests.sim.world import World

# The relay keeps its commit metadata under 3 500 characters: near that, ranges were cut.
METADATA_NEAR_CUT = 3300
_WRITE = re.compile(r"^writes: code (\S+) field (\S+):")


def classify(verdict: Verdict, world: World) -> list[str]:
    """The known windows this history shows (several may apply), else 'other'."""
    kinds: list[str] = []
    history = "\n".join(world.history)
    batch_max = world.scenario.config.batch_max_values
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
    if "batch_created_several_tasks" in history or any(
        v.startswith("tasks:") and ("recorded 2" in v or "has 2 results" in v)
        for v in verdict.violations
    ):
        kinds.append("a shared reference adopted another task")
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
