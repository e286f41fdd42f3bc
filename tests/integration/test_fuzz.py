"""Fuzz through Kafka: 10 000 records of many broken shapes among valid events.

The relay starts once and stays up; every broken record is dead-lettered exactly
once with a reason; every valid code reaches the simulator exactly once; the
committed offsets reach the end of every partition.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer

from devkit.harness import TopicFactory, make_topics
from service.core.reasons import Reason
from tests.api_support import simulator
from tests.integration.test_pipeline_resilience import STEADY, applied, one_code_events
from tests.pipeline_support import read_topic, relay_settings, running_relay, wait_for_commit

pytestmark = pytest.mark.kafka

RECORDS = 10_000
VALID = 300


def broken(rng: random.Random, n: int) -> bytes | None:
    """One record the contract refuses, of a shape picked by `n`."""
    good = {"constraints": {"extended_id": ["11X999999"]}, "scm_data": {"lot": "F"}}
    shapes: list[Any] = [
        lambda: bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 64))),  # random bytes
        lambda: b"\xff\xfe" + "éte".encode("latin-1"),  # not UTF-8
        lambda: b"[" * 100_000 + b"]" * 100_000,  # nesting 100 000 deep
        lambda: b'{"constraints": {"extended_id": ["a"]}, "scm_data": {"x": NaN}}',
        lambda: b'{"constraints": {"extended_id": ["a"]}, "scm_data": {"x": Infinity}}',
        lambda: b'{"constraints": {"extended_id": ["a"]}, "scm_data": {"x": 1e999999}}',
        lambda: b'{"constraints": {"extended_id": [' + b"7" * 5000 + b']}, "scm_data": {"x": "1"}}',
        lambda: b'{"constraints": {"extended_id": ["a"]}, "scm_data": {"x": "1", "x": "2"}}',
        lambda: None,  # a null value (a tombstone on the input topic)
        lambda: json.dumps([good]).encode(),  # an array
        lambda: rng.choice([b"42", b'"text"', b"true", b"null", b"3.5"]),  # scalars
        lambda: b'{"constraints": {"extended_id": ["a\\ud800"]}, "scm_data": {"x": "1"}}',
        lambda: json.dumps({**good, "campain": 11}).encode(),  # a typo
        lambda: json.dumps({**good, "scm_data": {"status": "1"}}).encode(),
        lambda: json.dumps({**good, "constraints": {"extended_id": [" 11X999999"]}}).encode(),
        lambda: json.dumps({"constraints": {}, "scm_data": {"lot": "F"}}).encode(),
        lambda: b"",
        lambda: b"{" + bytes(rng.getrandbits(7) for _ in range(40)),  # cut short
    ]
    return shapes[n % len(shapes)]()  # type: ignore[no-any-return]


async def test_ten_thousand_broken_records_never_stop_the_relay(
    kafka_bootstrap: str, topic_factory: TopicFactory
) -> None:
    rng = random.Random(20261128)
    topics = await make_topics(topic_factory, partitions=3)
    topics.input = await topic_factory.create(
        "scm-changes-fuzz", partitions=3, config={"max.message.bytes": str(4 * 1024 * 1024)}
    )
    valid = [json.dumps(item).encode() for item in one_code_events(VALID)]
    records: list[tuple[bytes | None, bytes | None]] = []
    for n in range(RECORDS - VALID - 1):
        key = None if rng.random() < 0.3 else f"k{rng.randint(0, 999)}".encode()
        value = broken(rng, n)
        # A record needs a key or a value: a null value comes with a key.
        records.append((key or b"null-value" if value is None else key, value))
    records.append(
        (
            None,
            json.dumps(
                {"constraints": {"extended_id": ["a"]}, "scm_data": {"note": "x" * 1_500_000}}
            ).encode(),
        )
    )
    for item in valid:
        records.insert(rng.randint(0, len(records)), (None, item))
    producer = AIOKafkaProducer(
        bootstrap_servers=kafka_bootstrap, max_request_size=4 * 1024 * 1024, linger_ms=20
    )
    await producer.start()
    try:
        sent = [await producer.send(topics.input, value, key=key) for key, value in records]
        positions = [await delivery for delivery in sent]
    finally:
        await producer.stop()
    invalid_at = {
        (meta.partition, meta.offset)
        for meta, (_, value) in zip(positions, records, strict=True)
        if value not in valid
    }
    async with simulator(STEADY, codes_per_campaign=VALID) as sim:
        settings = relay_settings(kafka_bootstrap, sim.base_url, topics)
        async with running_relay(settings) as relay:
            await wait_for_commit(kafka_bootstrap, topics, relay, timeout_s=240)
            relay.check_alive()
            dead = await read_topic(
                kafka_bootstrap, topics.dlq, expected=len(invalid_at), timeout_s=120
            )
            seen = await applied(sim, VALID)
    sources = Counter(
        (
            int(dict(r.headers)["scm_relay.source.partition"]),
            int(dict(r.headers)["scm_relay.source.offset"]),
        )
        for r in dead
    )
    assert set(sources) == invalid_at, "a broken record was not dead-lettered, or a good one was"
    assert max(sources.values()) == 1, "a record was dead-lettered twice"
    reasons = Counter(dict(r.headers)["scm_relay.error.reason"].decode() for r in dead)
    assert set(reasons) <= {reason.value for reason in Reason}
    assert dict(seen) == dict.fromkeys(range(VALID), 1), "a valid code was lost or updated twice"
