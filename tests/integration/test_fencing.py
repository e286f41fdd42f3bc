"""Fenced transactional offset commits (service/fencing.py) against the real broker.

A member that joined an older generation of its group must not commit: the
transaction carrying the commit (and everything written in it) is aborted.
This is what keeps a paused replica from committing after its partitions moved.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.structs import OffsetAndMetadata

from devkit.harness import TopicFactory, committed_reader, read_all, wait_until
from service import fencing
from tests.integration.test_kafka_features import started

pytestmark = pytest.mark.kafka


def member(bootstrap: str, topic: str, group: str) -> AIOKafkaConsumer:
    return AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        session_timeout_ms=10_000,
        heartbeat_interval_ms=500,
    )


async def joined(consumer: AIOKafkaConsumer) -> None:
    async def has_partitions() -> bool:
        await consumer.getmany(timeout_ms=100)
        return bool(consumer.assignment())

    await wait_until(has_partitions, what="the member to be assigned partitions")


def transactional(bootstrap: str, transactional_id: str) -> AIOKafkaProducer:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, transactional_id=transactional_id)
    fencing.install(producer)
    return producer


async def commit_in_transaction(
    producer: AIOKafkaProducer,
    sink: str,
    tp: TopicPartition,
    offset: int,
    group: str,
) -> None:
    await producer.begin_transaction()
    try:
        await producer.send_and_wait(sink, b"written with the commit")
        await producer.send_offsets_to_transaction({tp: OffsetAndMetadata(offset, "")}, group)
        await producer.commit_transaction()
    except BaseException:
        await producer.abort_transaction()
        raise


async def test_a_stale_generation_cannot_commit_and_its_records_are_aborted(
    kafka_bootstrap: str, topic_factory: TopicFactory, group_id_factory: Callable[[str], str]
) -> None:
    source = await topic_factory.create("source", partitions=2)
    sink = await topic_factory.create("sink")
    group = group_id_factory("group")
    producer = transactional(kafka_bootstrap, group_id_factory("txn"))
    async with (
        started(producer),
        started(member(kafka_bootstrap, source, group)) as first,
    ):
        await joined(first)
        stale = fencing.membership(first, group)
        tp = TopicPartition(source, 0)
        # The current generation commits.
        await commit_in_transaction(producer, sink, tp, 5, group=stale)
        # A second member joins: the group moves to a new generation, the first rejoins.
        async with started(member(kafka_bootstrap, source, group)) as second:
            await asyncio.gather(joined(first), joined(second))
            current = fencing.membership(first, group)
            assert current.generation_id > stale.generation_id
            with pytest.raises(fencing.GroupFencedError, match="IllegalGenerationError"):
                await commit_in_transaction(producer, sink, tp, 9, group=stale)
            # The producer is usable again, and the current generation still commits.
            await commit_in_transaction(producer, sink, tp, 7, group=current)

            async def committed_seven() -> bool:
                # Transactional offsets become visible once the commit marker is written.
                return bool(await first.committed(tp) == 7)

            await wait_until(committed_seven, what="offset 7 to be committed")
    async with started(committed_reader(kafka_bootstrap, sink)) as reader:
        values = [record.value for record in await read_all(reader, 3, timeout_s=5)]
    assert values == [b"written with the commit"] * 2  # the fenced one was aborted


async def test_an_unknown_member_cannot_commit(
    kafka_bootstrap: str, topic_factory: TopicFactory, group_id_factory: Callable[[str], str]
) -> None:
    source = await topic_factory.create("source")
    sink = await topic_factory.create("sink")
    group = group_id_factory("group")
    producer = transactional(kafka_bootstrap, group_id_factory("txn"))
    async with started(producer), started(member(kafka_bootstrap, source, group)) as first:
        await joined(first)
        real = fencing.membership(first, group)
        impostor = fencing.GroupGeneration(group, real.generation_id, "someone-else", None)
        with pytest.raises(fencing.GroupFencedError, match="UnknownMemberIdError"):
            await commit_in_transaction(
                producer, sink, TopicPartition(source, 0), 3, group=impostor
            )
        assert await first.committed(TopicPartition(source, 0)) is None


async def test_a_plain_group_id_still_commits_unfenced(
    kafka_bootstrap: str, topic_factory: TopicFactory, group_id_factory: Callable[[str], str]
) -> None:
    source = await topic_factory.create("source")
    sink = await topic_factory.create("sink")
    group = group_id_factory("group")
    producer = transactional(kafka_bootstrap, group_id_factory("txn"))
    async with started(producer):
        tp = TopicPartition(source, 0)
        await commit_in_transaction(producer, sink, tp, 4, group=group)
        async with started(member(kafka_bootstrap, source, group)) as reader:
            assert await reader.committed(tp) == 4
