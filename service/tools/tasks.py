"""`scm-relay tasks list|show|group`: a task as the ledger, the API and the results topic
each see it, side by side.

The ledger (`SCM_RELAY_TASKS_TOPIC`, compacted) holds the tasks still followed; the
results topic holds one result per finished task (and `progress` records of stuck
ones). Both are read to their current end without a consumer group; the API is asked
only by `show` (the task) and `group` (the task group), with the relay's token.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Final

from pydantic import ValidationError

from service.core.records import INTENT_KEY_PREFIX, PROGRESS_KEY_PREFIX, TaskLedgerRecord
from service.settings import Settings, SettingsError, require_token
from service.tools.output import Printer, tool_start

EXIT_OK: Final = 0
EXIT_NOT_FOUND: Final = 1
EXIT_USAGE: Final = 2
EXIT_UNAVAILABLE: Final = 3
STATES: Final = ("open", "complete", "failed", "short")


def seconds(stamp: Any) -> str | None:
    """An ISO time to the second, in UTC (`2026-11-29T06:41:30Z`), for a table."""
    if not isinstance(stamp, str):
        return None
    try:
        when = dt.datetime.fromisoformat(stamp.replace("Z", "+00:00")).astimezone(dt.UTC)
    except ValueError:
        return stamp
    return when.isoformat(timespec="seconds").replace("+00:00", "Z")


@dataclass
class TaskView:
    """What the relay's topics say about one task."""

    task_id: str
    ledger: dict[str, Any] | None = None
    result: dict[str, Any] | None = None
    progress: list[dict[str, Any]] = field(default_factory=list)

    @property
    def state(self) -> str:
        if self.result is not None:
            return str(self.result.get("state"))
        return "open" if self.ledger is not None else "unknown"

    @property
    def record(self) -> dict[str, Any]:
        return self.result or self.ledger or {}

    def row(self) -> dict[str, Any]:
        record = self.record
        values = sum(len(v) for v in (record.get("constraints") or {}).values())
        affected = (self.result or {}).get("codes_affected")
        expected = record.get("expected_codes")
        return {
            "task_id": self.task_id,
            "state": self.state + (" (short)" if (self.result or {}).get("short") else ""),
            "reference": record.get("reference"),
            "campaign": record.get("campaign"),
            "values": values,
            "codes": f"{'-' if affected is None else affected} of "
            f"{'-' if expected is None else expected}",
            "submitted": seconds(record.get("submitted_at")),
            "completed": seconds((self.result or {}).get("completed_at")),
            "events": len(record.get("events") or []),
        }

    def matches(self, state: str | None, reference: str | None) -> bool:
        if reference is not None and self.record.get("reference") != reference:
            return False
        if state == "short":
            return bool((self.result or {}).get("short"))
        return state is None or self.state == state


async def read_views(settings: Settings, wanted: str | None = None) -> dict[str, TaskView]:
    """Every task the ledger and the results topic know (only `wanted`, when given)."""
    from service.tools.kafka_io import read_to_end

    views: dict[str, TaskView] = {}

    def view(task_id: str) -> TaskView:
        return views.setdefault(task_id, TaskView(task_id))

    async for record in read_to_end(settings, settings.kafka.tasks_topic):
        key = (record.key or b"").decode(errors="replace")
        if key.startswith((INTENT_KEY_PREFIX, PROGRESS_KEY_PREFIX)) or (
            wanted is not None and key != wanted
        ):
            continue
        if record.value is None:  # a tombstone: the task's result was published
            if key in views:
                views[key].ledger = None
            continue
        try:
            ledger = TaskLedgerRecord.model_validate_json(record.value)
        except ValidationError:
            continue
        view(ledger.task_id).ledger = ledger.model_dump(mode="json")
    async for record in read_to_end(settings, settings.kafka.results_topic):
        try:
            document = json.loads(record.value or b"")
        except (UnicodeDecodeError, json.JSONDecodeError):
            continue
        task_id = document.get("task_id") if isinstance(document, dict) else None
        if not isinstance(task_id, str) or (wanted is not None and task_id != wanted):
            continue
        if document.get("kind") == "progress":
            view(task_id).progress.append(document)
        else:
            view(task_id).result = document
    return views


def run(args: argparse.Namespace) -> int:
    started = tool_start("tasks", args.json)
    if started is None:
        return EXIT_USAGE
    settings, printer = started
    from aiokafka.errors import KafkaError

    from service.tools.kafka_io import MissingTopicError

    try:
        if args.tasks_command == "list":
            return asyncio.run(_list(settings, args, printer))
        if args.tasks_command == "show":
            return asyncio.run(show(settings, args.task_id, printer))
        return asyncio.run(_group(settings, args.reference, printer))
    except MissingTopicError as exc:
        printer.error(f"scm-relay tasks: {exc}")
        return EXIT_USAGE
    except (KafkaError, TimeoutError) as exc:
        printer.error(f"scm-relay tasks: Kafka failed ({type(exc).__name__}: {exc})")
        return EXIT_UNAVAILABLE


# What fits a terminal; --json and `tasks show` have every field.
LIST_COLUMNS: Final = ["task_id", "state", "reference", "values", "codes", "submitted"]


async def _list(settings: Settings, args: argparse.Namespace, printer: Printer) -> int:
    views = await read_views(settings)
    chosen = [v for v in views.values() if v.matches(args.state, args.reference)]
    chosen.sort(key=lambda v: str(v.record.get("submitted_at") or ""))
    shown = deque((v.row() for v in chosen), maxlen=args.limit)
    if printer.as_json:
        printer.json({"matched": len(chosen), "tasks": list(shown)})
        return EXIT_OK
    printer.table("tasks (ledger and results)", LIST_COLUMNS, list(shown))
    more = f" (the newest {len(shown)} shown; --limit)" if len(chosen) > len(shown) else ""
    printer.line(f"{len(chosen)} task(s) matched{more}")
    return EXIT_OK


def _api_failure(outcome: Any) -> str:
    status = getattr(outcome, "status", None)
    reason = getattr(outcome, "reason", None)
    return (
        f"{type(outcome).__name__}"
        + (f" {status}" if status else "")
        + (f": {reason}" if reason else "")
    )


async def _api(settings: Settings, call: str, argument: str) -> tuple[Any, str | None]:
    """The API's view (a model dumped to JSON), or why there is none."""
    from service.scantrust.client import ScantrustClient

    try:
        require_token(settings.api)
    except SettingsError as exc:
        return None, str(exc)
    async with ScantrustClient(settings.api) as client:
        outcome = await getattr(client, call)(argument)
    if hasattr(outcome, "model_dump"):
        return outcome.model_dump(mode="json"), None
    return None, _api_failure(outcome)


SIDE_BY_SIDE: Final = [
    "state",
    "reference",
    "campaign",
    "codes_affected",
    "expected_codes",
    "shortfall",
    "submitted_at",
    "created_at",
    "started_at",
    "completed_at",
    "published_at",
]


def _cell(record: dict[str, Any] | None, name: str) -> Any:
    value = (record or {}).get(name)
    return seconds(value) if name.endswith("_at") else value


async def show(settings: Settings, task_id: str, printer: Printer) -> int:
    views, (api, api_problem) = await asyncio.gather(
        read_views(settings, wanted=task_id), _api(settings, "task", task_id)
    )
    view = views.get(task_id) or TaskView(task_id)
    if printer.as_json:
        printer.json(
            {
                "task_id": task_id,
                "ledger": view.ledger,
                "api": api,
                "api_problem": api_problem,
                "result": view.result,
                "progress": view.progress,
            }
        )
        return EXIT_OK if (view.ledger or view.result or api) else EXIT_NOT_FOUND
    ledger_state = "open (followed)" if view.ledger else "-"
    rows = []
    for name in SIDE_BY_SIDE:
        rows.append(
            {
                "field": name,
                "ledger": ledger_state if name == "state" else _cell(view.ledger, name),
                "api": _cell(api, name),
                "result": _cell(view.result, name),
            }
        )
    printer.table(f"task {task_id}", ["field", "ledger", "api", "result"], rows)
    record = view.record
    events = [
        {
            "event_id": e.get("event_id"),
            "topic": e.get("topic"),
            "partition": e.get("partition"),
            "offset": e.get("offset"),
        }
        for e in record.get("events") or []
    ]
    if events:
        printer.table("the events it carried", ["event_id", "topic", "partition", "offset"], events)
    if record.get("scm_data"):
        printer.line(f"scm_data: {json.dumps(record['scm_data'], ensure_ascii=False)}")
    if api_problem:
        printer.line(f"the API's view: none ({api_problem})")
    if view.progress:
        printer.line(f"{len(view.progress)} progress report(s) (stuck) before the result")
    if not (view.ledger or view.result or api):
        printer.line(f"no task {task_id} in the ledger, the results or the API")
        return EXIT_NOT_FOUND
    return EXIT_OK


async def _group(settings: Settings, reference: str, printer: Printer) -> int:
    views, (api, api_problem) = await asyncio.gather(
        read_views(settings), _api(settings, "task_group", reference)
    )
    tasks = [v.row() for v in views.values() if v.matches(None, reference)]
    if printer.as_json:
        printer.json(
            {"reference": reference, "api": api, "api_problem": api_problem, "tasks": tasks}
        )
        return EXIT_OK if (tasks or api) else EXIT_NOT_FOUND
    if api is not None:
        stats = api.get("state_stats") or {}
        printer.table(
            f"task group {reference!r} at the API",
            ["tasks", "codes_affected", "completed", "states", "started", "finished"],
            [
                {
                    "tasks": api.get("tasks_count"),
                    "codes_affected": api.get("codes_affected"),
                    "completed": api.get("completed"),
                    "states": ", ".join(f"{k} {v}" for k, v in stats.items() if v),
                    "started": seconds(api.get("started_at")),
                    "finished": seconds(api.get("completed_at")),
                }
            ],
        )
    else:
        printer.line(f"the API's task group: none ({api_problem})")
    printer.table(f"tasks with reference {reference!r} (ledger and results)", LIST_COLUMNS, tasks)
    if not (tasks or api):
        return EXIT_NOT_FOUND
    return EXIT_OK
