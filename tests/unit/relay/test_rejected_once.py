"""An event of rejected batches is dead-lettered once: split over two batches, and also
when what is batched again is a copy of it (claims.without and intents.resolution_batch
copy events with dataclasses.replace; the committer's memory of what it dead-lettered
was once keyed by the object and missed the copy)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from service.core.batching import Batch, Batcher, PendingEvent
from service.metrics import RelayMetrics
from service.relay.claims import without
from service.relay.item_writer import ItemWriter
from service.relay.ledger import WrittenRecords
from service.relay.messages import ApiRejection
from service.scantrust.outcomes import Rejected
from tests.unit.relay.fakes import FakeAccounting, FakeProducer, config
from tests.unit.relay.support import pending

REJECTION = Rejected(400, {"scm_data": ["bad"]}, '{"scm_data": ["bad"]}')


def writer() -> tuple[ItemWriter, FakeProducer]:
    producer = FakeProducer()
    items = ItemWriter(
        config(),
        producer=producer,
        accounting=FakeAccounting(),
        written=WrittenRecords(),
        metrics=RelayMetrics(CollectorRegistry()),
    )
    return items, producer


def batches_of(event: PendingEvent, max_values: int) -> list[Batch]:
    batcher = Batcher(max_values=max_values, max_keys=1, linger_s=1.0, max_open_batches=10)
    ready, _ = batcher.add(event, 0.0)
    return [*ready, *batcher.close_all()]


async def dead_letters_of(items: ItemWriter, producer: FakeProducer, rejected: list[Batch]) -> int:
    for batch in rejected:
        await producer.begin_transaction()
        await items.write(ApiRejection(batch, REJECTION, None), [])
        await producer.commit_transaction()
    return sum(1 for txn in producer.committed for topic, *_ in txn.records if topic == "dlq")


async def test_an_event_split_over_two_rejected_batches_is_dead_lettered_once() -> None:
    items, producer = writer()
    event = pending(["a", "b", "c", "d"])
    split = batches_of(event, max_values=2)
    assert len(split) == 2
    assert await dead_letters_of(items, producer, split) == 1


async def test_the_rest_of_a_rejected_event_read_in_again_is_not_dead_lettered_twice() -> None:
    """claims.without (readmitting what a given-up batch carried, or what is still unsent
    of a released event) copies the event with dataclasses.replace."""
    items, producer = writer()
    event = pending(["a", "b", "c", "d"])
    first, _second = batches_of(event, max_values=2)
    assert await dead_letters_of(items, producer, [first]) == 1
    rest = without(event, frozenset({0, 1}))
    assert rest is not None
    assert rest is not event
    (again,) = batches_of(rest, max_values=10)
    assert await dead_letters_of(items, producer, [again]) == 1, (
        "the event's raw bytes were dead-lettered a second time"
    )
