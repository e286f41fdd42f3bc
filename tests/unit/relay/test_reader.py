"""Intake's reading of its input partitions (service/relay/reader.py) against a fake
consumer: which partitions a round reads, stepping up to an undecodable batch, and a
poll that returned across a rebalance."""

from __future__ import annotations

import asyncio
from typing import Any

from aiokafka import TopicPartition
from prometheus_client import CollectorRegistry

from service.kafka import UndecodableRecordsError
from service.metrics import RelayMetrics
from service.relay.book import OffsetBook
from service.relay.ports import FetchedRecord
from service.relay.reader import InputReader
from tests.unit.relay.fakes import FakeConsumer, change
from tests.unit.relay.test_intake import Committer

P0, P1 = TopicPartition("in", 0), TopicPartition("in", 1)


def reader(
    consumer: FakeConsumer,
    book: OffsetBook,
    *,
    max_read_ahead: int = 1000,
    needed: dict[int, int] | None = None,
    handled: list[FetchedRecord] | None = None,
) -> InputReader:
    async def handle(record: FetchedRecord, _stop: asyncio.Event) -> None:
        if handled is not None:
            handled.append(record)

    return InputReader(
        consumer,
        book=book,
        committer=Committer(),
        metrics=RelayMetrics(CollectorRegistry()),
        clock=lambda: 0.0,
        max_read_ahead=max_read_ahead,
        timeout_ms=lambda: 0,
        needed_up_to=lambda _topic, partition: (needed or {}).get(partition),
        handle=handle,
    )


def restored(partitions: int) -> OffsetBook:
    book = OffsetBook()
    book.assigned({("in", p) for p in range(partitions)}, 1)
    for p in range(partitions):
        book.restore("in", p, 0, None)
        book.apply("in", p, None)
    return book


def test_a_reason_pauses_every_partition_and_none_resumes_them() -> None:
    consumer = FakeConsumer("in", 2)
    subject = reader(consumer, restored(2))
    subject.update_pause("API unavailable")
    assert subject.paused
    assert consumer.paused == {P0, P1}
    subject.update_pause(None)
    assert not subject.paused
    assert consumer.paused == set()


def test_a_partition_read_to_its_bound_waits_unless_an_open_intent_lies_further() -> None:
    consumer = FakeConsumer("in", 2)
    book = restored(2)
    for offset in range(10):  # read, none accounted: 10 beyond the commit point
        book.received("in", 0, offset)
    subject = reader(consumer, book, max_read_ahead=10)
    subject.update_pause(None)
    assert consumer.paused == {P0}, "only the partition at its bound waits"
    subject = reader(consumer, book, max_read_ahead=10, needed={0: 12})
    subject.update_pause(None)
    assert consumer.paused == set(), "an intent's events further on are read"


async def test_a_partition_is_stepped_up_to_a_batch_it_cannot_decode_then_stops() -> None:
    consumer = FakeConsumer("in", 2)
    for value in "abcd":
        consumer.append(change([value]), partition=0)
    consumer.append(change(["x"]), partition=1)
    consumer.undecodable[0] = 2
    handled: list[FetchedRecord] = []
    subject = reader(consumer, restored(2), handled=handled)
    for p in (0, 1):
        subject.read_from(TopicPartition("in", p), 0)
    stop = asyncio.Event()
    try:
        await subject.poll(stop)
    except UndecodableRecordsError as error:
        subject.undecodable(error)
    else:
        raise AssertionError("the fake consumer did not fail the poll")
    polled = await subject.poll(stop)
    assert [(r.partition, r.offset) for r in handled] == [(0, 0), (0, 1)], (
        "the records before the bad batch are taken one by one"
    )
    assert [(r.partition, r.offset) for r in polled.get(P1, [])] == [(1, 0)]
    subject.update_pause(None)
    assert P0 in consumer.paused, "the partition stopped at the batch reads on"
    assert P1 not in consumer.paused
    assert subject.stopped_reasons(), "readiness is not told of the stopped partition"


def test_records_a_poll_returned_across_a_rebalance_are_sought_back() -> None:
    consumer = FakeConsumer("in", 2)
    for _ in range(3):
        consumer.append(change(["a"]), partition=0)
        consumer.append(change(["b"]), partition=1)
    consumer.positions = {0: 3, 1: 3}
    records: dict[TopicPartition, Any] = {
        P0: consumer.logs[0][1:],
        P1: consumer.logs[1][1:],
    }
    consumer.assigned = {P0}  # partition 1 went to another member
    reader(consumer, restored(2)).unread(records)
    assert consumer.positions == {0: 1, 1: 3}
