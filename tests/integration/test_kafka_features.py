"""The Kafka features scm-relay's guarantees stand on, proved against the real broker.

DESIGN.md section 3 leans on: transactions that commit produced records and
consumer offsets together (guarantees 1 and 2), aborted transactions that
leave no trace, compacted topics with tombstones (the task ledger), and paused
partitions that keep a consumer in its group (guarantee 5). If a broker or
aiokafka upgrade breaks one of these, a test here fails first.
docs/kafka-compatibility.md records what each showed.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from devkit.harness import CALL_TIMEOUT_S, TopicFactory, committed_reader, read_all, wait_until

pytestmark = pytest.mark.kafka


@asynccontextmanager
async def started(client: Any) -> AsyncIterator[Any]:
    """Start an aiokafka client and always stop it."""
    await asyncio.wait_for(client.start(), timeout=CALL_TIMEOUT_S)
    try:
        yield client
    finally:
        await client.stop()


async def produce_plain(bootstrap: str, topic: str, values: list[bytes]) -> None:
    """Write `values` to `topic` outside any transaction."""
    async with started(AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")) as producer:
        for value in values:
            await producer.send_and_wait(topic, value)


async def consume_as_group(
    bootstrap: str, topic: str, group_id: str, expected: int
) -> tuple[TopicPartition, list[Any]]:
    """Read `expected` records of `topic` as a member of `group_id`, committing nothing."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=group_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_committed",
    )
    async with started(consumer):
        records = await read_all(consumer, expected)
    return TopicPartition(topic, 0), records


async def group_offset(bootstrap: str, group_id: str, tp: TopicPartition) -> int | None:
    """The offset `group_id` has committed for `tp`, read by a fresh consumer of that group."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group_id)
    async with started(consumer):
        offset: int | None = await asyncio.wait_for(consumer.committed(tp), CALL_TIMEOUT_S)
        return offset


async def test_transaction_commits_records_and_consumer_offsets_together(
    kafka_bootstrap: str, topic_factory: TopicFactory, group_id_factory: Callable[[str], str]
) -> None:
    source = await topic_factory.create("source")
    sink = await topic_factory.create("sink")
    group = group_id_factory("group")
    await produce_plain(kafka_bootstrap, source, [b"e0", b"e1", b"e2"])
    tp, consumed = await consume_as_group(kafka_bootstrap, source, group, expected=3)
    assert [r.value for r in consumed] == [b"e0", b"e1", b"e2"]

    producer = AIOKafkaProducer(
        bootstrap_servers=kafka_bootstrap, transactional_id=group_id_factory("txn")
    )
    async with started(producer), producer.transaction():
        await producer.send_and_wait(sink, b"ledger-record", key=b"task-1")
        await producer.send_offsets_to_transaction({tp: consumed[-1].offset + 1}, group)

    async with started(committed_reader(kafka_bootstrap, sink)) as reader:
        seen = await read_all(reader, expected=1)
    assert [(r.key, r.value) for r in seen] == [(b"task-1", b"ledger-record")]
    assert await group_offset(kafka_bootstrap, group, tp) == 3


async def test_aborted_transaction_leaves_no_records_and_no_offsets(
    kafka_bootstrap: str, topic_factory: TopicFactory, group_id_factory: Callable[[str], str]
) -> None:
    source = await topic_factory.create("source")
    sink = await topic_factory.create("sink")
    group = group_id_factory("group")
    await produce_plain(kafka_bootstrap, source, [b"e0", b"e1"])
    tp, consumed = await consume_as_group(kafka_bootstrap, source, group, expected=2)
    assert len(consumed) == 2

    producer = AIOKafkaProducer(
        bootstrap_servers=kafka_bootstrap, transactional_id=group_id_factory("txn")
    )
    async with started(producer):
        await producer.begin_transaction()
        await producer.send_and_wait(sink, b"aborted-1")
        await producer.send_and_wait(sink, b"aborted-2")
        await producer.send_offsets_to_transaction({tp: 2}, group)
        await producer.abort_transaction()
        # A committed marker after the aborted records tells the reader it has seen
        # everything up to that point, so "nothing seen" is not a mere timeout.
        async with producer.transaction():
            await producer.send_and_wait(sink, b"committed-marker")

    async with started(committed_reader(kafka_bootstrap, sink)) as reader:
        seen = await read_all(reader, expected=1)
        await asyncio.sleep(0.5)
        seen += await read_all(reader, expected=1, timeout_s=0.5)
    assert [r.value for r in seen] == [b"committed-marker"]

    # The aborted records were really written: a read_uncommitted reader sees them.
    uncommitted = AIOKafkaConsumer(
        sink,
        bootstrap_servers=kafka_bootstrap,
        isolation_level="read_uncommitted",
        auto_offset_reset="earliest",
    )
    async with started(uncommitted):
        raw = await read_all(uncommitted, expected=3)
    assert [r.value for r in raw] == [b"aborted-1", b"aborted-2", b"committed-marker"]

    assert await group_offset(kafka_bootstrap, group, tp) is None


async def rebuild_state(bootstrap: str, topic: str, expected_records: int) -> dict[bytes, bytes]:
    """Replay a compacted topic from the beginning: last value per key, tombstones delete."""
    state: dict[bytes, bytes] = {}
    async with started(committed_reader(bootstrap, topic)) as reader:
        for record in await read_all(reader, expected_records):
            if record.value is None:
                state.pop(record.key, None)
            else:
                state[record.key] = record.value
    return state


async def test_compacted_topic_tombstone_removes_key_on_rebuild(
    kafka_bootstrap: str, topic_factory: TopicFactory
) -> None:
    ledger = await topic_factory.create(
        "ledger",
        config={
            "cleanup.policy": "compact",
            # Small segments and an eager cleaner, so compaction happens within the test.
            "segment.ms": "200",
            "min.cleanable.dirty.ratio": "0.01",
            "delete.retention.ms": "100",
            "min.compaction.lag.ms": "0",
        },
    )
    resource = ConfigResource(ConfigResourceType.TOPIC, ledger)
    (described,) = await topic_factory.admin.describe_configs([resource])
    configs = {entry[0]: entry[1] for entry in described.resources[0][4]}
    assert configs["cleanup.policy"] == "compact"

    async with started(AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")) as p:
        await p.send_and_wait(ledger, b"open-1", key=b"task-a")
        await p.send_and_wait(ledger, b"open-1", key=b"task-b")
        await p.send_and_wait(ledger, None, key=b"task-a")  # task-a finished: tombstone
        await p.send_and_wait(ledger, b"open-2", key=b"task-b")

    assert await rebuild_state(kafka_bootstrap, ledger, expected_records=4) == {
        b"task-b": b"open-2"
    }

    # The broker's cleaner really removes superseded records: once segments roll, a
    # fresh replay reads fewer records yet rebuilds the same state.
    async def compacted() -> bool:
        async with started(AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)) as p:
            await p.send_and_wait(ledger, b"roll", key=b"segment-roller")
        async with started(committed_reader(kafka_bootstrap, ledger)) as reader:
            records = await read_all(reader, expected=10**6, timeout_s=1.0)
        keys = [r.key for r in records]
        return keys.count(b"task-b") == 1 and b"task-a" not in keys

    await wait_until(compacted, what="the log cleaner to compact the ledger", timeout_s=90)
    assert await rebuild_state(kafka_bootstrap, ledger, expected_records=2) == {
        b"task-b": b"open-2",
        b"segment-roller": b"roll",
    }


class RebalanceCounter(ConsumerRebalanceListener):  # type: ignore[misc]
    """Counts assignments and revocations, to tell whether the member was evicted."""

    def __init__(self) -> None:
        self.assigned = 0
        self.revoked = 0

    async def on_partitions_revoked(self, revoked: Any) -> None:
        # aiokafka also calls this, with nothing revoked, before the first join.
        if revoked:
            self.revoked += 1

    async def on_partitions_assigned(self, assigned: Any) -> None:
        self.assigned += 1


MAX_POLL_INTERVAL_MS = 2_000


async def joined_consumer(
    bootstrap: str, topic: str, group: str
) -> tuple[AIOKafkaConsumer, RebalanceCounter]:
    counter = RebalanceCounter()
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_poll_interval_ms=MAX_POLL_INTERVAL_MS,
        session_timeout_ms=10_000,
        heartbeat_interval_ms=500,
    )
    consumer.subscribe([topic], listener=counter)
    await asyncio.wait_for(consumer.start(), timeout=CALL_TIMEOUT_S)

    async def assigned() -> bool:
        await consumer.getmany(timeout_ms=100)
        return counter.assigned == 1

    await wait_until(assigned, what="the first assignment")
    return consumer, counter


async def test_paused_consumer_that_keeps_polling_stays_in_its_group(
    kafka_bootstrap: str, topic_factory: TopicFactory, group_id_factory: Callable[[str], str]
) -> None:
    topic = await topic_factory.create("input", partitions=2)
    consumer, counter = await joined_consumer(kafka_bootstrap, topic, group_id_factory("group"))
    try:
        consumer.pause(*consumer.assignment())
        await produce_plain(kafka_bootstrap, topic, [b"waiting"] * 5)
        loop = asyncio.get_running_loop()
        until = loop.time() + 3 * MAX_POLL_INTERVAL_MS / 1000
        while loop.time() < until:
            batches = await consumer.getmany(timeout_ms=200)
            assert batches == {}, "a paused partition returned records"
        assert (counter.assigned, counter.revoked) == (1, 0)
        tp = next(iter(consumer.assignment()))
        await consumer.commit({tp: 1})  # a member that was evicted could not commit
        consumer.resume(*consumer.assignment())
        records = await read_all(consumer, expected=5)
        assert len(records) == 5
        assert (counter.assigned, counter.revoked) == (1, 0)
    finally:
        await consumer.stop()


async def test_consumer_that_stops_polling_is_evicted_from_its_group(
    kafka_bootstrap: str, topic_factory: TopicFactory, group_id_factory: Callable[[str], str]
) -> None:
    """The contrast to the test above: without polling, max_poll_interval_ms evicts."""
    topic = await topic_factory.create("input")
    consumer, counter = await joined_consumer(kafka_bootstrap, topic, group_id_factory("group"))
    try:
        await asyncio.sleep(2 * MAX_POLL_INTERVAL_MS / 1000)

        async def rejoined() -> bool:
            await consumer.getmany(timeout_ms=100)
            return counter.revoked >= 1 and counter.assigned >= 2

        await wait_until(rejoined, what="the evicted member to rejoin")
    finally:
        await consumer.stop()
