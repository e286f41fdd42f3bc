"""Hostile strings in the data the tools print: rich markup, ESC and OSC sequences, C1
controls, bidirectional overrides, zero-width characters and very long values, in dead
letters, ledger results and input files. Every command that prints data shows them as
visible text in its table (never interpreted: no crash on `[/x]`, no link, no escape
sequence reaching the terminal) and as the exact data in its `--json` document, which
holds no raw control character either."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer

from devkit.harness import TopicFactory, Topics, make_topics
from service.core.reasons import Reason, Stage
from service.core.records import DeadLetterHeaders
from tests.tool_support import ToolRun, scm_relay, tool_settings

pytestmark = pytest.mark.kafka
API = "http://127.0.0.1:9/"  # nothing listens: `tasks show` and `group` report no API view
LONG = "L" * 5000
HOSTILE = [
    "lot[/x]",
    "[link=https://evil.example/]click[/link]",
    "[bold red]alarm[/]",
    "title\x1b]0;owned\x07",
    "\x1b]8;;https://evil.example/\x1b\\here\x1b]8;;\x1b\\",
    "wipe\x1b[2J\x1b[H",
    "c1\x9b31mred\x9d0;t\x9c",
    "abc\u202edcba",
    "zero\u200bwidth\ufeffbom\u2066iso\u2069",
    "line\u2028sep\u2029para",
    "del\x7fnul\x00bel\x07cr\rlf",
    LONG,
]
# Written here from the terminals' rules, not from the code under test: what must never
# reach a terminal raw (a line feed is the tables' own).
FORBIDDEN = re.compile(
    "[\x00-\x09\x0b-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2028\u2029\u2066-\u2069\ufeff]"
)


def assert_terminal_safe(run: ToolRun) -> None:
    for name, text in (("stdout", run.out), ("stderr", run.err)):
        found = FORBIDDEN.search(text)
        assert found is None, f"raw {found.group()!r} in {name}: {text[:2000]!r}"
    assert "Traceback" not in run.err, run.err
    assert "MarkupError" not in run.err, run.err


def assert_shown_as_text(run: ToolRun) -> None:
    """The markup is printed, not applied; the escapes are visible."""
    assert_terminal_safe(run)
    for shown in (
        "lot[/x]",
        "[link=https://evil.example/]click[/link]",
        "[bold red]alarm[/]",
        "\\x1b]0;owned\\x07",
        "abc\\u202edcba",
        "zero\\u200bwidth",
    ):
        assert shown in run.out, f"{shown!r} not in {run.out[:3000]!r}"
    # A very long value is cut in a table (--json has it whole).
    assert LONG not in run.out


def json_strings(document: Any) -> set[str]:
    if isinstance(document, str):
        return {document}
    if isinstance(document, dict):
        return set().union(*(json_strings(k) | json_strings(v) for k, v in document.items()))
    if isinstance(document, list):
        return set().union(set(), *(json_strings(item) for item in document))
    return set()


def assert_exact_json(run: ToolRun, expected: list[str]) -> Any:
    assert_terminal_safe(run)
    document = json.loads(run.out)
    strings = json_strings(document)
    missing = [value[:80] for value in expected if value not in strings]
    assert missing == [], f"not in the JSON as they are: {missing!r}"
    return document


@pytest.fixture
async def topics(kafka_bootstrap: str, topic_factory: TopicFactory) -> Topics:
    made = await make_topics(topic_factory, partitions=1)
    made.tasks = await topic_factory.create("scm-tasks", config={"cleanup.policy": "compact"})
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
    await producer.start()
    try:
        for n, text in enumerate(HOSTILE):
            headers = DeadLetterHeaders(
                stage=Stage.VALIDATE,
                reason=Reason.SCM_DATA_KEY_INVALID,
                message=text,
                field=f"scm_data.{text}",
                source_topic=made.input,
                source_partition=0,
                source_offset=n,
            )
            value = json.dumps({"constraints": {"extended_id": ["A1"]}, "scm_data": {text: text}})
            await producer.send_and_wait(
                made.dlq, value.encode(), key=b"k", headers=headers.to_kafka()
            )
            result = {
                "task_id": f"task-{n}-{text}",
                "kind": "result",
                "state": text,
                "reference": text,
                "campaign": text,
                "codes_affected": 1,
                "expected_codes": 1,
                "submitted_at": text,
                "completed_at": text,
                "events": [{"event_id": text, "topic": text, "partition": 0, "offset": n}],
                "scm_data": {text: text},
                "constraints": {"extended_id": [text]},
            }
            await producer.send_and_wait(made.results, json.dumps(result).encode())
    finally:
        await producer.stop()
    return made


async def tool(bootstrap: str, topics: Topics, *args: str, stdin: bytes | None = None) -> ToolRun:
    return await scm_relay(tool_settings(bootstrap, API, topics), *args, stdin=stdin)


async def test_dlq_list_and_replay(kafka_bootstrap: str, topics: Topics) -> None:
    table = await tool(kafka_bootstrap, topics, "dlq", "list", "--limit", "100")
    assert table.code == 0, table.err
    assert_shown_as_text(table)
    fields = [f"scm_data.{text}" for text in HOSTILE]
    document = assert_exact_json(
        await tool(kafka_bootstrap, topics, "dlq", "list", "--limit", "100", "--json"), fields
    )
    assert [row["field"] for row in document["dead_letters"]] == fields
    # The relay bounds a dead letter's message (the long one ends "[truncated]").
    assert [row["message"] for row in document["dead_letters"]][:-1] == HOSTILE[:-1]

    # Each original is refused again (a control character, a key that is no key).
    replay = await tool(kafka_bootstrap, topics, "dlq", "replay", "--dry-run")
    assert replay.code == 1, replay.err
    assert_shown_as_text(replay)
    replay_json = await tool(kafka_bootstrap, topics, "dlq", "replay", "--dry-run", "--json")
    assert replay_json.code == 1
    assert_exact_json(replay_json, fields)


async def test_tasks_list_show_and_group(kafka_bootstrap: str, topics: Topics) -> None:
    table = await tool(kafka_bootstrap, topics, "tasks", "list", "--limit", "100")
    assert table.code == 0, table.err
    assert_shown_as_text(table)
    document = assert_exact_json(
        await tool(kafka_bootstrap, topics, "tasks", "list", "--limit", "100", "--json"), HOSTILE
    )
    assert sorted(row["reference"] for row in document["tasks"]) == sorted(HOSTILE)

    # Markup, an OSC hyperlink, a bidirectional override (each run asks the API too).
    for n in (0, 4, 7):
        text = HOSTILE[n]
        task_id = f"task-{n}-{text}"
        shown = await tool(kafka_bootstrap, topics, "tasks", "show", task_id)
        assert shown.code == 0, shown.err
        assert_terminal_safe(shown)
        shown_json = await tool(kafka_bootstrap, topics, "tasks", "show", task_id, "--json")
        assert assert_exact_json(shown_json, [task_id, text])["result"]["reference"] == text
        group = await tool(kafka_bootstrap, topics, "tasks", "group", text)
        assert group.code == 0, group.err
        assert_terminal_safe(group)
        group_json = await tool(kafka_bootstrap, topics, "tasks", "group", text, "--json")
        assert [row["reference"] for row in assert_exact_json(group_json, [text])["tasks"]] == [
            text
        ]
    # The titles and the scm_data line carry the data too.
    shown = await tool(kafka_bootstrap, topics, "tasks", "show", "task-0-lot[/x]")
    assert "task task-0-lot[/x]" in shown.out
    assert 'scm_data: {"lot[/x]": "lot[/x]"}' in shown.out


async def test_publish_and_validate_quote_hostile_keys_harmlessly(
    kafka_bootstrap: str, topics: Topics, tmp_path: Path
) -> None:
    """The contract's messages quote a bad key with its control characters escaped; the
    markup in it is printed as text (it crashed `publish` before)."""
    lines = [
        json.dumps({"constraints": {"extended_id": ["A1"]}, "scm_data": {text: "v"}})
        for text in HOSTILE
    ]
    source = tmp_path / "hostile.jsonl"
    source.write_text("\n".join(lines) + "\n")
    table = await tool(kafka_bootstrap, topics, "publish", str(source), "--dry-run")
    assert table.code == 1, table.err
    assert_terminal_safe(table)
    assert "nothing published" in table.out
    for shown in ("key 'lot[/x]'", "key '[link=https://evil.example/]click[/link]'"):
        assert shown in table.out, table.out
    published = await tool(kafka_bootstrap, topics, "publish", str(source), "--dry-run", "--json")
    assert published.code == 1
    assert_terminal_safe(published)
    messages = [problem["message"] for problem in json.loads(published.out)["problems"]]
    assert any("key 'lot[/x]'" in message for message in messages), messages

    validated = await tool(kafka_bootstrap, topics, "validate", "-", stdin=source.read_bytes())
    assert validated.code == 1
    assert_terminal_safe(validated)
    verdicts = [json.loads(line) for line in validated.out.splitlines()]
    assert [verdict["reason"] for verdict in verdicts] == ["scm_data_key_invalid"] * len(HOSTILE)
