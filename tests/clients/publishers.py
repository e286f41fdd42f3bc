"""Publishing as real producers do: aiokafka, librdkafka (confluent-kafka, the client
most MES/ERP integrations publish with) and Kafka's own Java producer, each with any
compression codec, in a transaction or not.

The relay must read whatever record batches these write; the tests that use this
compare what reached the API with what was published, never with the relay's view.
"""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Final

from aiokafka import AIOKafkaProducer

from devkit.harness import KAFKA_LOCAL

JAVA_PUBLISH: Final = Path(__file__).resolve().parent / "JavaPublish.java"
CLIENTS: Final = ("aiokafka", "librdkafka", "java")
# Every compression codec Kafka defines ("none" leaves compression to the topic).
CODECS: Final = ("gzip", "snappy", "lz4", "zstd")
CALL_TIMEOUT_S: Final = 120.0


@dataclass(frozen=True)
class Outgoing:
    """One record to publish to an explicit partition."""

    partition: int
    key: bytes | None
    value: bytes


async def publish(
    client: str,
    bootstrap: str,
    topic: str,
    records: Sequence[Outgoing],
    *,
    codec: str,
    transactional_id: str | None = None,
) -> None:
    """Publish `records` with `client` ("aiokafka", "librdkafka" or "java") compressed
    with `codec` ("none" for none), all in one transaction when `transactional_id` is
    given; returns once every record is acknowledged (acks=all)."""
    if client == "aiokafka":
        await _aiokafka(bootstrap, topic, records, codec, transactional_id)
    elif client == "librdkafka":
        await asyncio.to_thread(_librdkafka, bootstrap, topic, records, codec, transactional_id)
    elif client == "java":
        await _java(bootstrap, topic, records, codec, transactional_id)
    else:
        raise ValueError(f"unknown client {client!r}")


async def _aiokafka(
    bootstrap: str,
    topic: str,
    records: Sequence[Outgoing],
    codec: str,
    transactional_id: str | None,
) -> None:
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        acks="all",
        linger_ms=20,
        compression_type=None if codec == "none" else codec,
        transactional_id=transactional_id,
        enable_idempotence=transactional_id is not None,
    )
    await asyncio.wait_for(producer.start(), CALL_TIMEOUT_S)
    try:
        if transactional_id is not None:
            await producer.begin_transaction()
        sent = [
            await producer.send(topic, r.value, key=r.key, partition=r.partition) for r in records
        ]
        if transactional_id is not None:
            await producer.commit_transaction()
        await asyncio.wait_for(asyncio.gather(*sent), CALL_TIMEOUT_S)
    finally:
        await producer.stop()


def _librdkafka(
    bootstrap: str,
    topic: str,
    records: Sequence[Outgoing],
    codec: str,
    transactional_id: str | None,
) -> None:
    from confluent_kafka import KafkaError, Message, Producer

    config: dict[str, str | int] = {
        "bootstrap.servers": bootstrap,
        "acks": "all",
        "linger.ms": 20,
        "compression.type": codec,
    }
    if transactional_id is not None:
        config["transactional.id"] = transactional_id
    producer = Producer(config)
    failures: list[str] = []

    def delivered(error: KafkaError | None, _message: Message) -> None:
        if error is not None:
            failures.append(str(error))

    if transactional_id is not None:
        producer.init_transactions(CALL_TIMEOUT_S)
        producer.begin_transaction()
    for record in records:
        producer.produce(
            topic, record.value, record.key, partition=record.partition, on_delivery=delivered
        )
        producer.poll(0)
    if transactional_id is not None:
        producer.commit_transaction(CALL_TIMEOUT_S)
    left = producer.flush(CALL_TIMEOUT_S)
    if left or failures:
        raise RuntimeError(f"librdkafka: {left} records unsent, failures {failures[:3]}")


@cache
def java_classpath() -> str:
    """Kafka's client jars (with its codecs), from the local broker's jar cache."""
    done = subprocess.run(
        [str(KAFKA_LOCAL), "classpath"],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    return done.stdout.strip()


async def _java(
    bootstrap: str,
    topic: str,
    records: Sequence[Outgoing],
    codec: str,
    transactional_id: str | None,
) -> None:
    lines = []
    for record in records:
        value = record.value.decode()
        if "\n" in value or "\t" in value:
            raise ValueError("the Java publisher takes one-line values without tabs")
        key = record.key.decode() if record.key else ""
        lines.append(f"{record.partition}\t{key}\t{value}\n")
    process = await asyncio.create_subprocess_exec(
        "java",
        "-cp",
        await asyncio.to_thread(java_classpath),
        str(JAVA_PUBLISH),
        bootstrap,
        topic,
        codec,
        transactional_id or "-",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate("".join(lines).encode()), CALL_TIMEOUT_S)
    if process.returncode != 0 or out.decode().strip() != str(len(records)):
        raise RuntimeError(f"JavaPublish exited {process.returncode}: {err.decode()[-2000:]}")
