"""The relay end to end: real Kafka broker, simulator over loopback HTTP."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer

from devkit.harness import TopicFactory, make_topics
from devkit.simulator.state import Faults
from service.core.records import DeadLetterHeaders
from tests.api_support import FAST, Simulator, simulator
from tests.pipeline_support import (
    event,
    publish,
    read_topic,
    relay_settings,
    results,
    running_relay,
    wait_for_commit,
)

pytestmark = pytest.mark.kafka


def code_key(item: Any) -> bytes | None:
    """Key each event by its first constraint value, as upstream is advised to."""
    if isinstance(item, bytes):
        return b"raw"
    values = next(iter(item["constraints"].values()))
    first = values[0] if isinstance(values, list) else values
    return str(first).encode()


async def history(sim: Simulator, extended_id: str) -> list[dict[str, Any]]:
    status, code = await sim.get(f"/_sim/codes?extended_id={extended_id}")
    assert status == 200, extended_id
    return list(code["history"])


def mixed_events() -> tuple[list[Any], dict[str, str]]:
    """Valid events over three markets (with a duplicate and a split-worthy list) and bad ones.

    Returns the events and, per code, the market it must end with.
    """
    events: list[Any] = []
    final: dict[str, str] = {}
    for n in range(60):
        market = ("DE", "FR", "IT")[n % 3]
        codes = [f"11X{n * 5 + i:06d}" for i in range(5)]
        events.append(event(codes, scm_data={"intended_market": market}, event_id=f"e{n}"))
        final.update(dict.fromkeys(codes, market))
    events.append(event(["11X000000", "11X000001"], scm_data={"intended_market": "DE"}))  # dup
    events.append(b"\xff\xfe not json")
    events.append(event(["11X000999"], scm_data={"status": "1"}, event_id="bad-status"))
    events.append(event(["11X000998"], key="message", scm_data={"a": "b"}, event_id="bad-key"))
    return events, final


async def test_events_reach_the_api_once_in_order_and_offsets_reach_the_end(
    kafka_bootstrap: str, topic_factory: TopicFactory
) -> None:
    topics = await make_topics(topic_factory, partitions=3)
    events, final = mixed_events()
    async with simulator(FAST, codes_per_campaign=400) as sim:
        settings = relay_settings(kafka_bootstrap, sim.base_url, topics, batch_max_values=100)
        await publish(kafka_bootstrap, topics.input, events, key_of=code_key)
        async with running_relay(settings) as relay:
            await wait_for_commit(kafka_bootstrap, topics, relay)
            stats = sim.account.stats
            outcomes = await results(kafka_bootstrap, topics.results, stats.uploads_accepted)
            assert stats.throttled == 0
            assert stats.upload_values_max <= 100
            # Every valid code got its market once. The two codes of the duplicate event get
            # it again only if their first batch had already left when the duplicate came.
            for extended_id, market in final.items():
                applied = [h["set"] for h in await history(sim, extended_id)]
                times = (1, 2) if extended_id in ("11X000000", "11X000001") else (1,)
                assert len(applied) in times, extended_id
                assert set(map(str, applied)) == {str({"intended_market": market})}
        dead = await read_topic(kafka_bootstrap, topics.dlq, expected=3)
    reasons = Counter(DeadLetterHeaders.from_kafka(record.headers).reason.value for record in dead)
    assert reasons == {"not_utf8": 1, "scm_data_key_status": 1, "constraint_key_message": 1}
    assert {record.value for record in dead} >= {b"\xff\xfe not json"}
    assert all(o["state"] == "complete" for o in outcomes)
    assert len(outcomes) in (3, 4)
    assert sum(o["codes_affected"] for o in outcomes) == 300 + 2 * (len(outcomes) - 3)
    for outcome in outcomes:
        assert len(outcome["constraints"]) == 1
        assert outcome["short"] is False


async def test_a_code_changed_a_b_a_reaches_the_api_in_that_order(
    kafka_bootstrap: str, topic_factory: TopicFactory
) -> None:
    """Guarantee 4 against a simulator whose tasks may overtake each other (jitter)."""
    topics = await make_topics(topic_factory, partitions=1)
    slow = Faults(pending_delay_s=0.2, progress_delay_s=0.3, jitter_s=0.3)
    sequence = ["A", "B", "A", "C", "A"]
    events = [
        event(["11X000007", "11X000008"], scm_data={"intended_market": m}, event_id=f"m{i}")
        for i, m in enumerate(sequence)
    ]
    async with simulator(slow) as sim:
        settings = relay_settings(kafka_bootstrap, sim.base_url, topics, batch_linger_ms=50)
        await publish(kafka_bootstrap, topics.input, events, key_of=code_key)
        async with running_relay(settings) as relay:
            await wait_for_commit(kafka_bootstrap, topics, relay)
            await results(kafka_bootstrap, topics.results, expected=len(sequence))
            for code in ("11X000007", "11X000008"):
                applied = [h["set"]["intended_market"] for h in await history(sim, code)]
                assert applied == sequence, code


async def test_api_rejection_dead_letters_the_batch_with_the_api_body(
    kafka_bootstrap: str, topic_factory: TopicFactory
) -> None:
    topics = await make_topics(topic_factory, partitions=1)
    # Campaign 12 has no rfid field: the API refuses the constraint key with a 400.
    bad = event(["E2801160000001"], key="rfid", scm_data={"lot": "L1"}, campaign=12)
    good = event(["12X000001"], scm_data={"lot": "L1"}, campaign=12)
    async with simulator() as sim:
        settings = relay_settings(kafka_bootstrap, sim.base_url, topics)
        await publish(kafka_bootstrap, topics.input, [bad, good])
        async with running_relay(settings) as relay:
            await wait_for_commit(kafka_bootstrap, topics, relay)
            (dead,) = await read_topic(kafka_bootstrap, topics.dlq, expected=1)
            (outcome,) = await results(kafka_bootstrap, topics.results, expected=1)
    headers = DeadLetterHeaders.from_kafka(dead.headers)
    assert (headers.stage.value, headers.reason.value, headers.api_status) == (
        "api",
        "api_rejected",
        400,
    )
    assert json.loads(headers.api_body or "{}") == {
        "constraints": {"rfid": "Invalid constraint name, 'rfid' is not a field of campaign 12"}
    }
    assert json.loads(dead.value) == bad
    assert outcome["constraints"] == {"extended_id": ["12X000001"]}


async def test_a_400_to_a_merged_request_dead_letters_each_of_its_events_and_nothing_else(
    kafka_bootstrap: str, topic_factory: TopicFactory
) -> None:
    """The vendor's own example: with `campaign` 11 the API checks that
    `client_custom_field` is a field of campaign 11; it is not, so the request is refused
    with a 400. The four events that merged into that request are all dead-lettered with
    the API's status and body; the events around them, in other batches, are applied."""
    topics = await make_topics(topic_factory, partitions=1)
    custom = {"client_custom_field": "some_val"}
    bad = [
        event([f"E2801160{n:06d}"], key="rfid", scm_data=custom, campaign=11, event_id=f"bad{n}")
        for n in range(4)
    ]
    market = [
        event([f"11X{n:06d}"], scm_data={"intended_market": "DE"}, campaign=11, event_id=f"ok{n}")
        for n in range(10, 13)
    ]
    # The same data without a campaign: accepted, and the field outside the code's
    # campaign discarded (as the vendor says), so the task touches no code.
    unchecked = event(["11X000020"], scm_data=custom, event_id="unchecked")
    ordered = [market[0], bad[0], bad[1], market[1], bad[2], unchecked, bad[3], market[2]]
    async with simulator(FAST) as sim:
        settings = relay_settings(kafka_bootstrap, sim.base_url, topics, batch_linger_ms=1000)
        await publish(kafka_bootstrap, topics.input, ordered)
        async with running_relay(settings) as relay:
            await wait_for_commit(kafka_bootstrap, topics, relay)
            outcomes = await results(kafka_bootstrap, topics.results, expected=2)
            dead = await read_topic(kafka_bootstrap, topics.dlq, expected=5, timeout_s=3)
        stats = sim.account.stats
        # One request carried the four events, and it alone was refused.
        assert (stats.requests["upload"], stats.uploads_accepted, stats.statuses["4xx"]) == (
            3,
            2,
            1,
        )
        for n in range(10, 13):
            assert [h["set"] for h in await history(sim, f"11X{n:06d}")] == [
                {"intended_market": "DE"}
            ]
        assert await history(sim, "11X000020") == []
    assert sorted(json.loads(record.value)["event_id"] for record in dead) == [
        "bad0",
        "bad1",
        "bad2",
        "bad3",
    ]
    offsets = {str(ordered.index(item)).encode() for item in bad}
    assert {dict(record.headers)["scm_relay.source.offset"] for record in dead} == offsets
    for record in dead:
        headers = dict(record.headers)
        assert (headers["scm_relay.error.stage"], headers["scm_relay.error.reason"]) == (
            b"api",
            b"api_rejected",
        )
        assert headers["scm_relay.error.api_status"] == b"400"
        assert json.loads(headers["scm_relay.error.api_body"]) == {
            "scm_data": {
                "client_custom_field": (
                    "Invalid key name, 'client_custom_field' is not a field of campaign 11"
                )
            }
        }
    assert sorted(o["codes_affected"] for o in outcomes) == [0, 3]


async def test_outage_then_recovery_and_a_throttle_storm_lose_nothing(
    kafka_bootstrap: str, topic_factory: TopicFactory
) -> None:
    topics = await make_topics(topic_factory, partitions=2)
    first = [event([f"11X{n:06d}"], scm_data={"batch_number": f"B{n}"}) for n in range(20)]
    second = [
        event([f"11X{n:06d}"], scm_data={"lot_x": "1"}, key="serial_number") for n in range(5)
    ]
    async with simulator(
        Faults(error_rate=1.0, pending_delay_s=0, progress_delay_s=0, jitter_s=0)
    ) as sim:
        settings = relay_settings(kafka_bootstrap, sim.base_url, topics)
        await publish(kafka_bootstrap, topics.input, first, key_of=code_key)
        async with running_relay(settings) as relay:
            await asyncio.sleep(3)
            assert sim.account.stats.uploads_accepted == 0
            await sim.set_faults(error_rate=0.0)
            await wait_for_commit(kafka_bootstrap, topics, relay)
            await sim.set_faults(throttle_storm_s=2)
            await publish(kafka_bootstrap, topics.input, second, key_of=code_key)
            await wait_for_commit(kafka_bootstrap, topics, relay)
        for n in range(20):
            applied = await history(sim, f"11X{n:06d}")
            assert [h["set"] for h in applied] == [{"batch_number": f"B{n}"}]
    assert await read_topic(kafka_bootstrap, topics.dlq, expected=1, timeout_s=2) == []


async def test_a_missing_topic_stops_the_relay_with_a_clear_error(
    kafka_bootstrap: str, topic_factory: TopicFactory
) -> None:
    """Guarantee 7: bad configuration stops loudly, before touching any event."""
    from structlog.testing import capture_logs

    from service.app import EXIT_CONFIG, run_relay

    topics = await make_topics(topic_factory, partitions=1)
    async with simulator() as sim:
        settings = relay_settings(kafka_bootstrap, sim.base_url, topics, dlq_topic="no-such-dlq")
        with capture_logs() as logs:
            code = await asyncio.wait_for(run_relay(settings, asyncio.Event()), timeout=60)
    assert code == EXIT_CONFIG
    (line,) = [entry for entry in logs if entry["event"] == "kafka_setup_invalid"]
    assert "no-such-dlq (SCM_RELAY_DLQ_TOPIC)" in line["problem"]


async def test_a_ledger_topic_without_compaction_is_refused(
    kafka_bootstrap: str, topic_factory: TopicFactory
) -> None:
    """The ledger must be compacted, or finished tasks would pile up forever."""
    from structlog.testing import capture_logs

    from service.app import EXIT_CONFIG, run_relay

    topics = await make_topics(topic_factory, partitions=1)
    plain = await topic_factory.create("scm-tasks", config={"cleanup.policy": "delete"})
    async with simulator() as sim:
        settings = relay_settings(kafka_bootstrap, sim.base_url, topics, tasks_topic=plain)
        with capture_logs() as logs:
            code = await asyncio.wait_for(run_relay(settings, asyncio.Event()), timeout=60)
    assert code == EXIT_CONFIG
    (line,) = [entry for entry in logs if entry["event"] == "kafka_setup_invalid"]
    assert "must have cleanup.policy=compact, it has 'delete'" in line["problem"]


async def test_a_record_too_large_for_a_dead_letter_is_dead_lettered_by_its_prefix(
    kafka_bootstrap: str, topic_factory: TopicFactory
) -> None:
    # The input topic allows 4 MiB records; the dead-letter topic keeps Kafka's 1 MiB.
    topics = await make_topics(topic_factory, partitions=1)
    topics.input = await topic_factory.create(
        "scm-changes-large", config={"max.message.bytes": str(4 * 1024 * 1024)}
    )
    huge = json.dumps(
        {"constraints": {"extended_id": ["11X000001"]}, "scm_data": {"note": "x" * 1_500_000}}
    ).encode()
    after = [event([f"11X00000{n}"], scm_data={"batch_number": "L"}) for n in (2, 3)]
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, max_request_size=4 * 1024 * 1024)
    await producer.start()
    try:
        await producer.send_and_wait(topics.input, huge)
        for item in after:
            await producer.send_and_wait(topics.input, json.dumps(item).encode())
    finally:
        await producer.stop()
    async with simulator(FAST, codes_per_campaign=10) as sim:
        settings = relay_settings(kafka_bootstrap, sim.base_url, topics)
        async with running_relay(settings) as relay:
            await wait_for_commit(kafka_bootstrap, topics, relay)
            (dead,) = await read_topic(kafka_bootstrap, topics.dlq, expected=1)
            await results(kafka_bootstrap, topics.results, expected=1)
        done = [await history(sim, f"11X00000{n}") for n in (2, 3)]
    headers = dict(dead.headers)
    assert headers["scm_relay.error.reason"] == b"record_too_large"
    assert headers["scm_relay.source.size"] == str(len(huge)).encode()
    assert headers["scm_relay.value.truncated"] == b"true"
    assert headers["scm_relay.source.offset"] == b"0"
    assert dead.value == huge[: len(dead.value)]
    assert len(dead.value) == 64 * 1024
    assert all(len(changes) == 1 for changes in done), "the events after it were not applied"


async def test_long_values_are_split_into_requests_whose_ledger_records_kafka_takes(
    kafka_bootstrap: str, topic_factory: TopicFactory
) -> None:
    # Ten valid events of 200 values of 1 000 characters (206 KB each): one request of
    # 1 000 values would make a ledger record over Kafka's 1 MiB limit after the API had
    # created the task.
    topics = await make_topics(topic_factory, partitions=1)
    events = [
        event([f"L{n:02d}{v:03d}" + "x" * 994 for v in range(200)], scm_data={"lot": "Z"})
        for n in range(10)
    ]
    async with simulator(FAST, codes_per_campaign=10) as sim:
        settings = relay_settings(kafka_bootstrap, sim.base_url, topics, batch_linger_ms=1000)
        await publish(kafka_bootstrap, topics.input, events)
        async with running_relay(settings) as relay:
            await wait_for_commit(kafka_bootstrap, topics, relay)
            uploads = sim.account.stats.uploads_accepted
            outcomes = await results(kafka_bootstrap, topics.results, expected=uploads)
        assert sim.account.stats.upload_values_total == 2000
        assert sim.account.stats.upload_values_max <= 256 * 1024 // 1000
    assert len(outcomes) == uploads >= 2000 * 1000 // (256 * 1024)


async def test_dead_letters_fit_a_dead_letter_topic_with_a_small_record_limit(
    kafka_bootstrap: str, topic_factory: TopicFactory
) -> None:
    # The dead-letter topic takes records of 200 000 bytes at most (read at start); a
    # broken record of 300 000 bytes, within the input's limits, still becomes one.
    topics = await make_topics(topic_factory, partitions=1)
    topics.dlq = await topic_factory.create("scm-dlq-small", config={"max.message.bytes": "200000"})
    broken = b"{" + b"x" * 300_000
    await publish(
        kafka_bootstrap,
        topics.input,
        [broken, event(["11X000001"], scm_data={"batch_number": "S"})],
    )
    async with simulator(FAST, codes_per_campaign=10) as sim:
        settings = relay_settings(kafka_bootstrap, sim.base_url, topics)
        async with running_relay(settings) as relay:
            await wait_for_commit(kafka_bootstrap, topics, relay)
            (dead,) = await read_topic(kafka_bootstrap, topics.dlq, expected=1)
            (outcome,) = await results(kafka_bootstrap, topics.results, expected=1)
        assert outcome["codes_affected"] == 1
    headers = dict(dead.headers)
    assert headers["scm_relay.value.truncated"] == b"true"
    assert headers["scm_relay.source.size"] == b"300001"
    assert dead.value == broken[: len(dead.value)]
    assert len(dead.value) < 200_000


async def test_an_event_with_several_keys_is_a_request_of_its_own(
    kafka_bootstrap: str, topic_factory: TopicFactory
) -> None:
    """Events with one key merge among themselves, across keys as batch_max_keys allows;
    each event with several keys is sent alone, exactly as published, and counts one
    expected code per value."""
    topics = await make_topics(topic_factory, partitions=1)
    market = {"intended_market": "DE"}
    multi = {
        "extended_id": ["11X000003"],
        "serial_number": ["SN11-000004"],
        "rfid": ["E2801160000005"],
    }
    other_multi = {"extended_id": ["11X000008"], "serial_number": "SN11-000009"}
    events = [
        event(["11X000001", "11X000002"], scm_data=market, campaign=11, event_id="s1"),
        {"constraints": multi, "scm_data": market, "campaign": 11, "event_id": "m1"},
        event(["11X000006"], scm_data=market, campaign=11, event_id="s2"),
        {"constraints": other_multi, "scm_data": market, "campaign": 11, "event_id": "m2"},
        event("SN11-000007", key="serial_number", scm_data=market, campaign=11, event_id="s3"),
    ]
    async with simulator() as sim:
        settings = relay_settings(
            kafka_bootstrap, sim.base_url, topics, batch_max_keys=5, batch_linger_ms=1000
        )
        await publish(kafka_bootstrap, topics.input, events)
        async with running_relay(settings) as relay:
            await wait_for_commit(kafka_bootstrap, topics, relay)
            outcomes = await results(kafka_bootstrap, topics.results, expected=3)
            assert sim.account.stats.uploads_accepted == 3
            sent: dict[tuple[str, ...], dict[str, Any]] = {}
            for outcome in outcomes:
                status, task = await sim.get(f"/_sim/tasks/{outcome['task_id']}")
                assert status == 200
                event_ids = tuple(sorted(e["event_id"] for e in outcome["events"]))
                sent[event_ids] = {"task": task, "outcome": outcome}
    assert set(sent) == {("m1",), ("m2",), ("s1", "s2", "s3")}
    # The simulator's view of each request: exactly the event's constraints, every key
    # (one value shown as a string, as in the vendor's example task).
    assert sent[("m1",)]["task"]["details"]["constraints"] == {
        "extended_id": "11X000003",
        "serial_number": "SN11-000004",
        "rfid": "E2801160000005",
    }
    assert sent[("m2",)]["task"]["details"]["constraints"] == {
        "extended_id": "11X000008",
        "serial_number": "SN11-000009",
    }
    assert sent[("s1", "s2", "s3")]["task"]["details"]["constraints"] == {
        "extended_id": ["11X000001", "11X000002", "11X000006"],
        "serial_number": "SN11-000007",
    }
    for entry in sent.values():
        assert entry["task"]["details"]["scm_data"] == market
        outcome = entry["outcome"]
        assert outcome["state"] == "complete"
        # Identifier keys only: one expected code per value (the simulator reads several
        # keys as a union, so each is met in full).
        assert outcome["expected_codes"] == sum(len(v) for v in outcome["constraints"].values())
        assert outcome["codes_affected"] == outcome["expected_codes"]
        assert outcome["short"] is False
