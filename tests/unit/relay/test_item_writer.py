"""What each item becomes inside the committer's open transaction, written on its own
(no commit, no offsets): refusals of batches that moved, the order of a record's
writes, dead letters of a rejection by position, a result's deferred `done`."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime

from prometheus_client import CollectorRegistry

from service.core.batching import Done
from service.core.task_outcomes import task_outcome
from service.metrics import RelayMetrics
from service.relay.item_writer import ItemWriter
from service.relay.ledger import WrittenRecords
from service.relay.messages import ApiRejection, IntentWrite, LedgerAppend, TaskFinished
from service.scantrust.outcomes import Rejected, TaskApiState
from tests.unit.relay.fakes import FakeAccounting, FakeProducer, config
from tests.unit.relay.support import api_task, batch, ledger_record
from tests.unit.relay.test_intents import intent


async def writer() -> tuple[ItemWriter, FakeProducer, FakeAccounting, WrittenRecords]:
    """A writer over a producer whose transaction is open."""
    producer, accounting, written = FakeProducer(), FakeAccounting(), WrittenRecords()
    items = ItemWriter(
        config(),
        producer=producer,
        accounting=accounting,
        written=written,
        metrics=RelayMetrics(CollectorRegistry()),
    )
    await producer.begin_transaction()
    return items, producer, accounting, written


async def sent(producer: FakeProducer) -> list[tuple[str, bytes | None, bytes | None]]:
    """(topic, key, value) of everything written into the open transaction."""
    await producer.commit_transaction()
    (transaction,) = producer.committed
    return [(topic, key, value) for topic, key, value, _ in transaction.records]


async def test_an_intent_of_a_batch_intake_no_longer_claims_is_refused_unwritten() -> None:
    items, producer, accounting, written = await writer()
    accounting.revoked.add("b-moved")
    write = IntentWrite(intent(["a"], [(0, 1)], batch_id="b-moved"))
    await items.write(write, [])
    assert write.refused
    assert await sent(producer) == []
    assert written.take_intent("intent:b-moved") is None


async def test_a_record_is_written_before_its_intent_closes_and_its_batch_is_accounted() -> None:
    items, producer, accounting, written = await writer()
    uploaded = batch(["a", "b"])
    first = ledger_record("t1", ["a", "b"], batch_id=uploaded.batch_id)
    second = ledger_record("t2", ["a", "b"], batch_id=uploaded.batch_id)
    await items.write(LedgerAppend(first, uploaded, more=[second]), [])
    key = f"intent:{uploaded.batch_id}".encode()
    records = await sent(producer)
    assert [(topic, k) for topic, k, _ in records] == [
        ("tasks", b"t1"),
        ("tasks", b"t2"),
        ("tasks", key),
        ("tasks", key),
    ]
    closure = json.loads(records[2][2] or b"")
    assert (closure["outcome"], closure["task_ids"]) == ("recorded", ["t1", "t2"])
    assert records[3][2] is None, "the intent's tombstone follows its closure"
    assert accounting.batches == [uploaded.batch_id]
    assert written.take("t2") == second


async def test_a_record_of_a_batch_that_moved_is_refused_and_accounts_nothing() -> None:
    items, producer, accounting, _ = await writer()
    moved = batch(["a"])
    accounting.revoked.add(moved.batch_id)
    append = LedgerAppend(ledger_record("t1", ["a"], batch_id=moved.batch_id), moved)
    await items.write(append, [])
    assert append.refused
    assert await sent(producer) == []
    assert accounting.batches == []


async def test_a_resolved_rejection_dead_letters_events_it_never_read_by_position() -> None:
    items, producer, accounting, _ = await writer()
    refused = batch(["a"])
    (held,) = refused.events()
    own = Done(held.source.topic, held.source.partition, held.source.offset)
    elsewhere = Done("in", 3, 41)  # another replica's event: no bytes here
    rejection = Rejected(400, {"scm_data": ["bad"]}, '{"scm_data": ["bad"]}')
    await items.write(ApiRejection(refused, rejection, [own, elsewhere]), [])
    dead = [(key, value) for topic, key, value in await sent(producer) if topic == "dlq"]
    assert dead == [(held.key, held.raw), (None, b"")], "each event once, by position if unread"
    assert accounting.sources == [own, elsewhere]


async def test_a_finished_task_leaves_its_done_to_run_after_the_commit() -> None:
    items, producer, _, _ = await writer()
    forgotten: list[str] = []
    outcome = task_outcome(
        ledger_record("t9", ["c"]),
        api_task("t9", TaskApiState.COMPLETE, 1),
        published_at=datetime.now(UTC),
    )
    finished: list[Callable[[], None]] = []
    await items.write(TaskFinished(outcome, lambda: forgotten.append("t9")), finished)
    assert forgotten == [], "done before the transaction committed"
    assert [(topic, key) for topic, key, _ in await sent(producer)] == [
        ("out", b"t9"),
        ("tasks", b"t9"),
    ]
    (done,) = finished
    done()
    assert forgotten == ["t9"]
