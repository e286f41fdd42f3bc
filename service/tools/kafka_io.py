"""Kafka for the tools: read a topic's committed records to the end it had when asked,
and a transactional producer. Both with the relay's own connection settings."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Final

from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.errors import UnknownTopicOrPartitionError

from service.settings import Settings

START_TIMEOUT_S: Final = 60.0
# Kafka's default transaction.max.timeout.ms: a tool's transaction must end within it.
TRANSACTION_TIMEOUT_MS: Final = 900_000


class MissingTopicError(Exception):
    """The topic the tool needs does not exist (a usage error, exit 2)."""


def options(settings: Settings) -> dict[str, Any]:
    from service.kafka import client_options

    return client_options(settings.kafka)


async def read_to_end(
    settings: Settings, topic: str, *, since_ms: int | None = None
) -> AsyncIterator[Any]:
    """Every committed record of `topic` (all partitions, from `since_ms` when given) up to
    the end each partition had when the read began; no consumer group, nothing committed.

    A record batch that cannot be decoded raises `UndecodableRecordsError` (a KafkaError
    naming the partition and offset), which the tools report as a Kafka failure."""
    from service.kafka import DecodingConsumer, stop_client

    consumer = DecodingConsumer(
        **options(settings),
        isolation_level="read_committed",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    async with asyncio.timeout(START_TIMEOUT_S):
        await consumer.start()
    try:
        partitions = consumer.partitions_for_topic(topic)
        if partitions is None:
            await consumer._client.force_metadata_update()
            partitions = consumer.partitions_for_topic(topic)
        if not partitions:
            raise MissingTopicError(f"the topic {topic} does not exist")
        assigned = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(assigned)
        ends = await consumer.end_offsets(assigned)
        starts = await consumer.beginning_offsets(assigned)
        if since_ms is not None:
            found = await consumer.offsets_for_times({tp: since_ms for tp in assigned})
            for tp in assigned:
                at = found.get(tp)
                starts[tp] = ends[tp] if at is None else at.offset
        open_partitions = set()
        for tp in assigned:
            consumer.seek(tp, starts[tp])
            if starts[tp] < ends[tp]:
                open_partitions.add(tp)
        while open_partitions:
            batches = await consumer.getmany(*open_partitions, timeout_ms=1000)
            for tp, records in batches.items():
                for record in records:
                    if record.offset < ends[tp]:
                        yield record
            for tp in list(open_partitions):
                # Aborted records and markers have offsets too: the position is what counts.
                if await consumer.position(tp) >= ends[tp]:
                    open_partitions.discard(tp)
    finally:
        await stop_client(consumer)


@asynccontextmanager
async def transactional_producer(settings: Settings, transactional_id: str) -> AsyncIterator[Any]:
    """An idempotent, transactional producer (acks=all), started and always stopped."""
    producer = AIOKafkaProducer(
        **options(settings),
        transactional_id=transactional_id,
        enable_idempotence=True,
        acks="all",
        transaction_timeout_ms=TRANSACTION_TIMEOUT_MS,
    )
    from service.kafka import stop_client

    try:
        async with asyncio.timeout(START_TIMEOUT_S):
            await producer.start()
        yield producer
    finally:
        await stop_client(producer)


async def require_topic(producer: Any, topic: str, hint: str) -> None:
    try:
        await producer.partitions_for(topic)
    except UnknownTopicOrPartitionError as exc:
        raise MissingTopicError(f"the topic {topic} does not exist ({hint})") from exc
