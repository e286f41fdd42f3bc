"""The simulation's verdict, from what the world shows: the vendor API's log and the
topics' records, judged against the workload. It shares no code with the relay: it
reads records as JSON and Kafka headers as bytes, and knows the workload's truth.

The rules (docs/design.md section 13):
1. every invalid event is dead-lettered exactly once, and no valid event is;
2. per code and field, the values the API wrote are the published ones, in
   publication order, no event's change applied twice (the same value published by
   consecutive events may be written once: merged events share a request);
   so the final state is the last published change;
3. every task the API created is recorded in the ledger exactly once and has exactly
   one result;
4. every input partition's committed offset reaches its end.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sim.api import Applied
from sim.kafka import Record
from sim.workload import Published


@dataclass
class Verdict:
    """What broke, by rule (empty: the history is clean)."""

    violations: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not self.violations

    def add(self, rule: str, what: str) -> None:
        self.violations.append(f"{rule}: {what}")


def judge(
    published: Sequence[tuple[Published, int]],
    applied: Sequence[Applied],
    created: Sequence[str],
    topics: Mapping[str, Sequence[Record]],
    names: Mapping[str, str],
    committed: Mapping[int, int],
    ends: Mapping[int, int],
) -> Verdict:
    """`published`: each record with the offset it got; `applied`: the API's log;
    `created`: ids of every task the API created; `topics`: every committed record of
    each topic by role name; `names`: role -> topic name; `committed`/`ends`: the input
    group's committed offsets and the input partitions' ends."""
    verdict = Verdict()
    _dead_letters(verdict, published, topics["dlq"])
    _writes(verdict, published, applied)
    _tasks(verdict, created, topics["tasks"], topics["results"])
    for partition, end in sorted(ends.items()):
        if committed.get(partition, 0) < end:
            verdict.add(
                "progress", f"partition {partition} committed {committed.get(partition)} of {end}"
            )
    return verdict


def _dead_letters(
    verdict: Verdict, published: Sequence[tuple[Published, int]], letters: Sequence[Record]
) -> None:
    seen: Counter[tuple[int, int]] = Counter()
    for letter in letters:
        headers = {k: v.decode() for k, v in letter.headers}
        seen[
            (int(headers["scm_relay.source.partition"]), int(headers["scm_relay.source.offset"]))
        ] += 1
    for record, offset in published:
        times = seen.pop((record.partition, offset), 0)
        if not record.valid and times != 1:
            verdict.add(
                "dead letters",
                f"invalid record {record.partition}/{offset} dead-lettered {times} times",
            )
        if record.valid and times:
            verdict.add(
                "dead letters",
                f"valid record {record.partition}/{offset} dead-lettered {times} times",
            )
    for position, times in seen.items():
        verdict.add(
            "dead letters", f"a dead letter names {position}, which nobody published ({times}x)"
        )


def _runs(values: Sequence[str]) -> list[tuple[str, int]]:
    runs: list[tuple[str, int]] = []
    for value in values:
        if runs and runs[-1][0] == value:
            runs[-1] = (value, runs[-1][1] + 1)
        else:
            runs.append((value, 1))
    return runs


def _writes(
    verdict: Verdict, published: Sequence[tuple[Published, int]], applied: Sequence[Applied]
) -> None:
    expected: dict[tuple[str, str], list[str]] = defaultdict(list)
    for record, _offset in sorted(published, key=lambda p: (p[0].partition, p[1])):
        if record.valid:
            for code in record.codes:
                for name, value in record.scm_data:
                    expected[(code, name)].append(value)
    written: dict[tuple[str, str], list[str]] = defaultdict(list)
    for task in sorted(applied, key=lambda a: a.at):
        for code in task.codes:
            for name, value in task.scm_data.items():
                written[(code, name)].append(value)
    for key in sorted(set(expected) | set(written)):
        want, got = _runs(expected.get(key, [])), _runs(written.get(key, []))
        code, name = key
        if [v for v, _ in want] != [v for v, _ in got]:
            verdict.add(
                "writes",
                f"code {code} field {name}: published {_show(expected.get(key, []))}, "
                f"written {_show(written.get(key, []))}",
            )
            continue
        for (value, published_times), (_, written_times) in zip(want, got, strict=True):
            if written_times > published_times:
                verdict.add(
                    "writes",
                    f"code {code} field {name}: {value!r} written {written_times} times for "
                    f"{published_times} consecutive event(s)",
                )


def _show(values: Sequence[str]) -> str:
    text = ", ".join(values)
    return f"[{text if len(text) < 200 else text[:200] + '...'}]"


def _tasks(
    verdict: Verdict,
    created: Sequence[str],
    ledger: Sequence[Record],
    results: Sequence[Record],
) -> None:
    recorded: Counter[str] = Counter()
    for record in ledger:
        # A task ledger record: keyed by its task id (docs/design.md section 2); the
        # ledger holds other records (intents, progress) under other keys.
        key = (record.key or b"").decode()
        if record.value is None:
            continue
        entry = json.loads(record.value)
        if isinstance(entry, dict) and entry.get("task_id") == key:
            recorded[key] += 1
    outcomes: Counter[str] = Counter()
    for record in results:
        document: dict[str, Any] = json.loads(record.value or b"{}")
        if "codes_affected" in document:  # an outcome, not a progress report
            outcomes[str(document.get("task_id"))] += 1
    for task_id in created:
        if recorded.get(task_id, 0) != 1:
            verdict.add("tasks", f"task {task_id} recorded {recorded.get(task_id, 0)} times")
        if outcomes.get(task_id, 0) != 1:
            verdict.add("tasks", f"task {task_id} has {outcomes.get(task_id, 0)} results")
    for task_id in sorted(set(recorded) - set(created)):
        verdict.add("tasks", f"the ledger records {task_id}, which the API never created")
