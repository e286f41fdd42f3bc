"""`scm-relay publish` against the real broker: what reaches the input topic, and that
nothing does when a row is invalid, the file malformed or Kafka unreachable."""

from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from devkit.harness import TopicFactory, Topics, make_topics, relay_environment
from tests.pipeline_support import read_topic
from tests.tool_support import ToolRun, scm_relay, tool_settings

pytestmark = pytest.mark.kafka
API = "http://127.0.0.1:9/"  # publish never calls the API
TEMPLATE = (
    "\ufeffextended_id,production_date,intended_market,lot\n"  # a BOM, as Excel writes
    "0A70X1,2026-11-27,DE,\n"
    "0A70X2,2026-11-27,DE,\n"
    "0A70X3,2026-11-28,FR,L7\n"
    "0A70X4,2026-11-27,DE,\n"
)


async def publish(
    bootstrap: str, topics: Topics, *args: str, stdin: bytes | None = None, **overrides: Any
) -> ToolRun:
    settings = tool_settings(bootstrap, API, topics, **overrides)
    return await scm_relay(settings, "publish", *args, stdin=stdin)


async def values_on(bootstrap: str, topic: str, expected: int) -> list[Any]:
    return await read_topic(bootstrap, topic, expected, timeout_s=10)


async def test_a_template_csv_becomes_events_grouped_by_their_data(
    kafka_bootstrap: str, topic_factory: TopicFactory, tmp_path: Path
) -> None:
    topics = await make_topics(topic_factory)
    csv_file = tmp_path / "template.csv"
    csv_file.write_text(TEMPLATE, encoding="utf-8")
    run = await publish(
        kafka_bootstrap,
        topics,
        str(csv_file),
        "--campaign",
        "11",
        "--reference",
        "line 7",
        "--json",
    )
    assert run.code == 0, run.err
    report = run.json()
    digest = hashlib.sha256(csv_file.read_bytes()).hexdigest()
    assert report["sha256"] == digest
    assert (report["rows"], report["events"], report["values"]) == (4, 2, 4)
    assert report["published_events"] == 2

    records = await values_on(kafka_bootstrap, topics.input, 3)
    assert len(records) == 2
    events = sorted((json.loads(r.value) for r in records), key=lambda e: e["event_id"])
    assert events == [
        {
            "constraints": {"extended_id": ["0A70X1", "0A70X2", "0A70X4"]},
            "scm_data": {"production_date": "2026-11-27", "intended_market": "DE"},
            "campaign": 11,
            "reference": "line 7",
            "event_id": f"csv-{digest[:16]}-2",
        },
        {
            "constraints": {"extended_id": ["0A70X3"]},
            "scm_data": {"production_date": "2026-11-28", "intended_market": "FR", "lot": "L7"},
            "campaign": 11,
            "reference": "line 7",
            "event_id": f"csv-{digest[:16]}-4",
        },
    ]
    headers = dict(records[0].headers)
    assert headers["scm_relay.publish.sha256"] == digest.encode()
    assert headers["scm_relay.publish.source"] == str(csv_file).encode()


async def test_an_invalid_row_publishes_nothing_and_names_its_line(
    kafka_bootstrap: str, topic_factory: TopicFactory, tmp_path: Path
) -> None:
    topics = await make_topics(topic_factory)
    csv_file = tmp_path / "bad.csv"
    csv_file.write_text(TEMPLATE + "0A70X5, 2026-11-27,DE,\n0A70X6,2026-11-27\n")
    run = await publish(kafka_bootstrap, topics, str(csv_file), "--json")
    assert run.code == 1
    problems = [(p["line"], p["reason"]) for p in run.json()["problems"]]
    assert problems == [(6, "scm_data_value_whitespace"), (7, "csv_cell_count")]
    assert await values_on(kafka_bootstrap, topics.input, 1) == []

    table = await publish(kafka_bootstrap, topics, str(csv_file))
    assert table.code == 1
    assert "nothing published" in table.out
    assert "scm_data_value_whitespace" in table.out

    skipped = await publish(kafka_bootstrap, topics, str(csv_file), "--skip-invalid", "--json")
    assert skipped.code == 0
    assert skipped.json()["published_values"] == 4
    assert len(await values_on(kafka_bootstrap, topics.input, 3)) == 2


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("extended_id,lot,lot\nA1,x,y\n", "column 3 'lot' repeats column 2"),
        ("extended_id,lot number\nA1,x\n", "not a valid field key"),
        ("", "the file is empty"),
    ],
)
async def test_a_bad_header_is_refused_whole(
    kafka_bootstrap: str, topic_factory: TopicFactory, tmp_path: Path, text: str, message: str
) -> None:
    topics = await make_topics(topic_factory)
    csv_file = tmp_path / "bad.csv"
    csv_file.write_text(text)
    run = await publish(kafka_bootstrap, topics, str(csv_file))
    assert run.code == 1
    assert message in run.err
    assert "nothing published" in run.err
    assert await values_on(kafka_bootstrap, topics.input, 1) == []


async def test_a_malformed_csv_is_reported_at_its_line(
    kafka_bootstrap: str, topic_factory: TopicFactory, tmp_path: Path
) -> None:
    topics = await make_topics(topic_factory)
    csv_file = tmp_path / "broken.csv"
    csv_file.write_text('extended_id,lot\nA1,L1\nA2,"L2\nA3,L3\n')
    run = await publish(kafka_bootstrap, topics, str(csv_file), "--json")
    assert run.code == 1
    assert [p["reason"] for p in run.json()["problems"]] == ["csv_malformed"]
    not_utf8 = tmp_path / "latin1.csv"
    not_utf8.write_bytes("extended_id,lot\nA1,Müller\n".encode("latin-1"))
    refused = await publish(kafka_bootstrap, topics, str(not_utf8))
    assert refused.code == 1
    assert "not UTF-8" in refused.err
    assert await values_on(kafka_bootstrap, topics.input, 1) == []


async def test_json_lines_from_standard_input(
    kafka_bootstrap: str, topic_factory: TopicFactory
) -> None:
    topics = await make_topics(topic_factory)
    lines = (
        b'{"event_id": "mes-1", "constraints": {"extended_id": ["A1"]}, "scm_data": {"lot": "1"}}\n'
        b'{"constraints": {"serial_number": [7]}, "scm_data": {"lot": "2"}}\n'
    )
    run = await publish(kafka_bootstrap, topics, "-", "--json", stdin=lines)
    assert run.code == 0, run.err
    digest = hashlib.sha256(lines).hexdigest()
    ids = sorted(
        json.loads(r.value)["event_id"] for r in await values_on(kafka_bootstrap, topics.input, 3)
    )
    assert ids == [f"jsonl-{digest[:16]}-2", "mes-1"]

    bad = await publish(kafka_bootstrap, topics, "-", stdin=lines + b'{"constraints": {}}\n')
    assert bad.code == 1
    assert "3" in bad.out  # the line


async def test_publishing_the_same_file_again_gives_the_same_event_ids(
    kafka_bootstrap: str, topic_factory: TopicFactory, tmp_path: Path
) -> None:
    topics = await make_topics(topic_factory)
    csv_file = tmp_path / "template.csv"
    csv_file.write_text(TEMPLATE)
    for _ in range(2):
        assert (await publish(kafka_bootstrap, topics, str(csv_file))).code == 0
    ids = [
        json.loads(r.value)["event_id"] for r in await values_on(kafka_bootstrap, topics.input, 5)
    ]
    assert len(ids) == 4
    assert sorted(Counter(ids).values()) == [2, 2], ids


async def test_usage_errors_exit_2(
    kafka_bootstrap: str, topic_factory: TopicFactory, tmp_path: Path
) -> None:
    topics = await make_topics(topic_factory)
    csv_file = tmp_path / "template.csv"
    csv_file.write_text(TEMPLATE)
    missing = await publish(kafka_bootstrap, topics, str(tmp_path / "nope.csv"))
    assert missing.code == 2
    assert "cannot read" in missing.err
    no_topic = await publish(kafka_bootstrap, topics, str(csv_file), "--topic", "no-such-topic")
    assert no_topic.code == 2
    assert "no-such-topic does not exist" in no_topic.err
    unknown = await publish(kafka_bootstrap, topics, str(tmp_path / "x.txt"))
    assert unknown.code == 2


async def test_kafka_unreachable_exits_3(topic_factory: TopicFactory, tmp_path: Path) -> None:
    topics = await make_topics(topic_factory)
    csv_file = tmp_path / "template.csv"
    csv_file.write_text(TEMPLATE)
    run = await publish("127.0.0.1:9", topics, str(csv_file))
    assert run.code == 3
    assert "nothing published" in run.err


PEAK_RSS = """
import resource, runpy, sys
sys.argv = ["scm-relay", *sys.argv[1:]]
try:
    runpy.run_module("service", run_name="__main__")
except SystemExit as exit:
    code = exit.code
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)
sys.exit(code)
"""


@pytest.mark.timeout(600)
async def test_a_million_rows_are_published_in_flat_memory(
    kafka_bootstrap: str, topic_factory: TopicFactory, tmp_path: Path
) -> None:
    topics = await make_topics(topic_factory)
    peaks = {}
    for rows in (100_000, 1_000_000):
        csv_file = tmp_path / f"{rows}.csv"
        with csv_file.open("w") as out:
            out.write("extended_id,production_date,intended_market\n")
            for n in range(rows):
                out.write(f"C{n:08d},2026-11-{27 + n % 2},{'DE' if n % 3 else 'FR'}\n")
        settings = tool_settings(kafka_bootstrap, API, topics)
        done = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-c", PEAK_RSS, "publish", str(csv_file), "--json"],
            env=relay_environment(settings),
            capture_output=True,
            timeout=500,
            check=False,
        )
        assert done.returncode == 0, done.stderr.decode()[-2000:]
        report = json.loads(done.stdout)
        assert report["published_values"] == rows
        assert report["published_events"] == pytest.approx(rows / 1000, abs=6)
        peaks[rows] = int(done.stderr.decode().split()[-1])  # KiB
    print(f"peak RSS: {peaks}")
    assert peaks[1_000_000] < peaks[100_000] + 20 * 1024, peaks
