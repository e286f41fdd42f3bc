"""`scm-relay dlq list` and `dlq replay` against the real broker: dead letters written as
the relay writes them (its own header model), listed, replayed once, refused when the
record would be refused again."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer

from devkit.harness import TopicFactory, Topics, make_topics
from service.core.reasons import Reason, Stage
from service.core.records import DeadLetterHeaders
from tests.pipeline_support import publish, read_topic
from tests.tool_support import ToolRun, scm_relay, tool_settings

pytestmark = pytest.mark.kafka
API = "http://127.0.0.1:9/"
GOOD = {"constraints": {"extended_id": ["A1"]}, "scm_data": {"lot": "L1"}}
STATUS = {"constraints": {"extended_id": ["A2"]}, "scm_data": {"status": "1"}}


async def write_dead_letters(bootstrap: str, topics: Topics, letters: list[dict[str, Any]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        for n, letter in enumerate(letters):
            headers = DeadLetterHeaders(
                stage=letter.get("stage", Stage.VALIDATE),
                reason=letter["reason"],
                message=letter.get("message", "refused"),
                source_topic=topics.input,
                source_partition=0,
                source_offset=n,
                field=letter.get("field"),
                api_status=letter.get("api_status"),
            )
            await producer.send_and_wait(
                topics.dlq, letter["value"], key=f"k{n}".encode(), headers=headers.to_kafka()
            )
    finally:
        await producer.stop()


async def dlq(bootstrap: str, topics: Topics, *args: str) -> ToolRun:
    return await scm_relay(tool_settings(bootstrap, API, topics), "dlq", *args)


@pytest.fixture
async def letters(kafka_bootstrap: str, topic_factory: TopicFactory) -> Topics:
    topics = await make_topics(topic_factory)
    await write_dead_letters(
        kafka_bootstrap,
        topics,
        [
            {"reason": Reason.INVALID_JSON, "stage": Stage.DECODE, "value": b"{not json"},
            {
                "reason": Reason.SCM_DATA_KEY_STATUS,
                "field": "scm_data.status",
                "value": json.dumps(STATUS).encode(),
                "message": "Invalid key name, use 'activation_status' instead of 'status'",
            },
            {
                "reason": Reason.API_REJECTED,
                "stage": Stage.API,
                "api_status": 400,
                "value": json.dumps(GOOD).encode(),
            },
        ],
    )
    return topics


async def test_list_shows_each_dead_letter_and_filters(
    kafka_bootstrap: str, letters: Topics
) -> None:
    run = await dlq(kafka_bootstrap, letters, "list", "--json")
    assert run.code == 0, run.err
    rows = run.json()["dead_letters"]
    assert [(r["offset"], r["reason"], r["field"]) for r in rows] == [
        ("0:0", "invalid_json", None),
        ("0:1", "scm_data_key_status", "scm_data.status"),
        ("0:2", "api_rejected", None),
    ]
    assert rows[1]["source"] == f"{letters.input}/0/1"
    assert rows[1]["replayed"] is None

    only = await dlq(kafka_bootstrap, letters, "list", "--reason", "api_rejected", "--json")
    assert [r["offset"] for r in only.json()["dead_letters"]] == ["0:2"]
    newest = await dlq(kafka_bootstrap, letters, "list", "--limit", "1", "--json")
    assert newest.json()["matched"] == 3
    assert [r["offset"] for r in newest.json()["dead_letters"]] == ["0:2"]
    future = await dlq(kafka_bootstrap, letters, "list", "--since", "2999-01-01", "--json")
    assert future.json()["dead_letters"] == []
    table = await dlq(kafka_bootstrap, letters, "list")
    assert "scm_data_key_status" in table.out
    assert "3 dead letter(s) matched" in table.out


async def test_an_original_that_is_valid_is_replayed_once(
    kafka_bootstrap: str, letters: Topics
) -> None:
    run = await dlq(kafka_bootstrap, letters, "replay", "--reason", "api_rejected", "--json")
    assert run.code == 0, run.err
    assert run.json()["replayed"] == 1
    (record,) = await read_topic(kafka_bootstrap, letters.input, 2, timeout_s=5)
    assert json.loads(record.value) == GOOD
    assert record.key == b"k2"
    headers = dict(record.headers)
    assert headers["scm_relay.replay.dlq_offset"] == b"2"
    assert headers["scm_relay.replay.reason"] == b"api_rejected"

    again = await dlq(kafka_bootstrap, letters, "replay", "--reason", "api_rejected", "--json")
    assert again.code == 0
    assert again.json()["replayed"] == 0
    assert again.json()["already_replayed"] == ["0:2"]
    assert len(await read_topic(kafka_bootstrap, letters.input, 2, timeout_s=3)) == 1
    listed = (await dlq(kafka_bootstrap, letters, "list", "--json")).json()["dead_letters"]
    assert listed[2]["replayed"] is not None
    assert len(listed) == 3, "a replay marker was listed as a dead letter"

    forced = await dlq(kafka_bootstrap, letters, "replay", "--offsets", "2", "--force", "--json")
    assert forced.json()["replayed"] == 1
    assert len(await read_topic(kafka_bootstrap, letters.input, 3, timeout_s=5)) == 2


async def test_an_original_that_would_be_refused_again_refuses_the_replay(
    kafka_bootstrap: str, letters: Topics
) -> None:
    run = await dlq(kafka_bootstrap, letters, "replay", "--offsets", "0-2", "--json")
    assert run.code == 1
    problems = {r["offset"]: r["problem"] for r in run.json()["dead_letters"]}
    assert "would be refused again: invalid_json" in problems["0:0"]
    assert "scm_data_key_status" in problems["0:1"]
    assert problems["0:2"] is None
    assert await read_topic(kafka_bootstrap, letters.input, 1, timeout_s=3) == []


async def test_a_fixed_record_is_replayed_and_a_fix_still_invalid_is_refused(
    kafka_bootstrap: str, letters: Topics, tmp_path: Path
) -> None:
    still_wrong = tmp_path / "still-wrong.jsonl"
    still_wrong.write_text(json.dumps({"offset": 1, "event": STATUS}) + "\n")
    refused = await dlq(
        kafka_bootstrap, letters, "replay", "--offsets", "1", "--fixed", str(still_wrong), "--json"
    )
    assert refused.code == 1
    (row,) = refused.json()["dead_letters"]
    assert "the fix would be refused again" in row["problem"]
    assert await read_topic(kafka_bootstrap, letters.input, 1, timeout_s=3) == []

    fixed_event = {**STATUS, "scm_data": {"activation_status": "1"}}
    fix = tmp_path / "fix.jsonl"
    fix.write_text(json.dumps({"offset": 1, "event": fixed_event}) + "\n")
    dry = await dlq(
        kafka_bootstrap, letters, "replay", "--offsets", "1", "--fixed", str(fix), "--dry-run"
    )
    assert dry.code == 0
    assert "would be replayed" in dry.out
    assert await read_topic(kafka_bootstrap, letters.input, 1, timeout_s=3) == []

    run = await dlq(kafka_bootstrap, letters, "replay", "--offsets", "1", "--fixed", str(fix))
    assert run.code == 0, run.err + run.out
    (record,) = await read_topic(kafka_bootstrap, letters.input, 2, timeout_s=5)
    assert json.loads(record.value) == fixed_event
    assert dict(record.headers)["scm_relay.replay.fixed"] == b"true"


async def test_usage_errors(kafka_bootstrap: str, letters: Topics, tmp_path: Path) -> None:
    bad_since = await dlq(kafka_bootstrap, letters, "list", "--since", "yesterday")
    assert bad_since.code == 2
    assert "--since" in bad_since.err
    no_rows = await dlq(kafka_bootstrap, letters, "list", "--limit", "0")
    assert no_rows.code == 2
    assert "'0' is not a whole number of at least 1" in no_rows.err
    bad_offsets = await dlq(kafka_bootstrap, letters, "replay", "--offsets", "5-2")
    assert bad_offsets.code == 2
    fix = tmp_path / "fix.jsonl"
    fix.write_text(json.dumps({"offset": 99, "event": GOOD}) + "\n")
    unknown = await dlq(kafka_bootstrap, letters, "replay", "--fixed", str(fix))
    assert unknown.code == 2
    assert "0:99" in unknown.err
    fix.write_text("not json\n")
    malformed = await dlq(kafka_bootstrap, letters, "replay", "--fixed", str(fix))
    assert malformed.code == 2
    assert "fix.jsonl:1" in malformed.err


async def test_a_dead_letter_naming_another_topic_copies_nothing_from_it(
    kafka_bootstrap: str, topic_factory: TopicFactory
) -> None:
    """A record forged into the dead-letter topic, naming a topic the operator can read,
    must not make the replay copy that topic's record to the input."""
    topics = await make_topics(topic_factory)
    private = await topic_factory.create("private")
    forged = DeadLetterHeaders(
        stage=Stage.API,
        reason=Reason.API_REJECTED,
        message="refused",
        source_topic=private,
        source_partition=0,
        source_offset=0,
    )
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
    await producer.start()
    try:
        await producer.send_and_wait(private, json.dumps(GOOD).encode(), key=b"private")
        # Written without its value, as the relay writes an API rejection: the replay
        # would read the "original" from the source position the headers name.
        await producer.send_and_wait(topics.dlq, b"", key=b"k", headers=forged.to_kafka())
    finally:
        await producer.stop()
    await write_dead_letters(
        kafka_bootstrap,
        topics,
        [{"reason": Reason.API_REJECTED, "stage": Stage.API, "value": json.dumps(GOOD).encode()}],
    )

    run = await dlq(kafka_bootstrap, topics, "replay", "--json")
    assert run.code == 1, run.err
    document = run.json()
    assert document["not_from_input_topic"] == 1
    problems = {row["offset"]: row["problem"] for row in document["dead_letters"]}
    assert f"its source header names the topic {private!r}, not the input topic" in problems["0:0"]
    assert problems["0:1"] is None
    assert await read_topic(kafka_bootstrap, topics.input, 1, timeout_s=3) == []
    table = await dlq(kafka_bootstrap, topics, "replay")
    assert table.code == 1
    assert f"1 name a source topic other than {topics.input}: nothing published" in table.out


async def write_marker(bootstrap: str, topics: Topics, of: str, body: dict[str, Any]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        await producer.send_and_wait(
            topics.dlq,
            json.dumps(body).encode(),
            key=f"replayed:{of}".encode(),
            partition=0,
            headers=[("scm_relay.replay.of", of.encode())],
        )
    finally:
        await producer.stop()


async def test_forged_replay_markers_hide_no_dead_letter(
    kafka_bootstrap: str, letters: Topics
) -> None:
    """Only a marker whose named input record is this dead letter's replayed copy counts."""
    await publish(kafka_bootstrap, letters.input, [GOOD], key_of=lambda _e: b"upstream")
    (upstream,) = await read_topic(kafka_bootstrap, letters.input, 1, timeout_s=5)
    stamp = {"replayed_at": "2026-01-01T00:00:00Z", "input_topic": letters.input, "fixed": False}
    forged = [
        stamp,  # names no copy at all
        {**stamp, "input_partition": upstream.partition, "input_offset": upstream.offset},
        {**stamp, "input_partition": upstream.partition, "input_offset": 10_000},
        {**stamp, "input_topic": "elsewhere", "input_partition": 0, "input_offset": 0},
    ]
    for body in forged:
        await write_marker(kafka_bootstrap, letters, "0:2", body)

    listed = (await dlq(kafka_bootstrap, letters, "list", "--json")).json()["dead_letters"]
    assert listed[2]["replayed"] is None
    reasons = listed[2]["ignored_markers"]
    assert len(reasons) == 4
    assert "names no input position of its copy" in reasons[3]
    assert "is no replay of it" in reasons[2]
    assert "not written yet" in reasons[1]
    assert "names the input topic 'elsewhere'" in reasons[0]
    table = await dlq(kafka_bootstrap, letters, "list")
    assert "replay markers that prove no replay were ignored for: 0:2" in table.out

    run = await dlq(kafka_bootstrap, letters, "replay", "--reason", "api_rejected", "--json")
    assert run.code == 0, run.err
    assert (run.json()["replayed"], run.json()["already_replayed"]) == (1, [])
    assert len(await read_topic(kafka_bootstrap, letters.input, 2, timeout_s=5)) == 2

    # The real replay's marker names its copy: now the dead letter is replayed.
    again = await dlq(kafka_bootstrap, letters, "replay", "--reason", "api_rejected", "--json")
    assert (again.json()["replayed"], again.json()["already_replayed"]) == (0, ["0:2"])
    listed = (await dlq(kafka_bootstrap, letters, "list", "--json")).json()["dead_letters"]
    assert listed[2]["replayed"] is not None
    assert listed[2]["replay_proof"] == "verified"


async def test_a_fixed_record_is_keyed_as_publish_keys_it(
    kafka_bootstrap: str, letters: Topics, topic_factory: TopicFactory, tmp_path: Path
) -> None:
    """A fix naming other codes than the original goes where `publish` sends that event,
    not under the original's key."""
    fixed_event = {
        "constraints": {"extended_id": ["B7", "B8"]},
        "scm_data": {"activation_status": "1"},
    }
    fix = tmp_path / "fix.jsonl"
    fix.write_text(json.dumps({"offset": 1, "event": fixed_event}) + "\n")
    run = await dlq(kafka_bootstrap, letters, "replay", "--offsets", "1", "--fixed", str(fix))
    assert run.code == 0, run.err + run.out
    (replayed,) = await read_topic(kafka_bootstrap, letters.input, 2, timeout_s=5)

    elsewhere = await topic_factory.create("published")
    events = tmp_path / "events.jsonl"
    events.write_text(json.dumps(fixed_event) + "\n")
    published = await scm_relay(
        tool_settings(kafka_bootstrap, API, letters), "publish", str(events), "--topic", elsewhere
    )
    assert published.code == 0, published.err
    (by_publish,) = await read_topic(kafka_bootstrap, elsewhere, 2, timeout_s=5)
    assert replayed.key == by_publish.key
    assert replayed.key != b"k1"
