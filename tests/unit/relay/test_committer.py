"""The committer against a fake transactional producer: one transaction per round,
nothing counts as done before its commit."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime

import pytest
from aiokafka import TopicPartition
from prometheus_client import CollectorRegistry

from service.core.task_outcomes import task_outcome
from service.metrics import RelayMetrics
from service.relay.committer import Committer, ReplicaFencedError
from service.relay.ledger import WrittenRecords
from service.relay.messages import (
    ApiRejection,
    LedgerAppend,
    ResultFence,
    TaskFinished,
)
from service.scantrust.outcomes import Rejected, TaskApiState
from tests.unit.relay.fakes import FakeAccounting, FakeProducer, config
from tests.unit.relay.support import api_task, batch, dead_letter, ledger_record


async def recorded(stage: Committer, append: LedgerAppend) -> None:
    """Queue a ledger record and wait until it is committed, as the uploaders do."""
    await stage.submit(append)
    await append.recorded


def committer(
    producer: FakeProducer, accounting: FakeAccounting
) -> tuple[Committer, WrittenRecords]:
    written = WrittenRecords()
    stage = Committer(
        config(),
        producer=producer,
        accounting=accounting,
        written=written,
        metrics=RelayMetrics(CollectorRegistry()),
    )
    return stage, written


async def test_a_ledger_record_and_the_offsets_it_releases_commit_together() -> None:
    producer, accounting = FakeProducer(), FakeAccounting()
    stage, written = committer(producer, accounting)
    runner = asyncio.create_task(stage.run())
    uploaded = batch(["a", "b"])
    record = ledger_record("t1", ["a", "b"], batch_id=uploaded.batch_id)
    await stage.submit(dead_letter(0))
    await recorded(stage, LedgerAppend(record, uploaded))
    await stage.close()
    await runner
    keys = [key for key, _ in producer.written("tasks")]
    # The task, then the closure of its intent and the intent's tombstone, in one go,
    # and the progress record of the partition whose offset moved.
    intent = f"intent:{uploaded.batch_id}".encode()
    assert keys == [b"t1", intent, intent, b"progress:in:0"]
    assert producer.written("tasks")[3][1] == b"progress 1"
    closure = json.loads(producer.written("tasks")[1][1] or b"")
    assert (closure["kind"], closure["outcome"], closure["task_ids"]) == (
        "intent_closed",
        "recorded",
        ["t1"],
    )
    assert producer.written("tasks")[2][1] is None
    assert producer.written("dlq") == [(b"k", b"{")]
    assert accounting.batches == [uploaded.batch_id]
    assert accounting.dead == [("in", 0, 0)]
    # The offsets travel in the transaction that carried what accounts for them.
    (with_offsets,) = [t for t in producer.committed if t.offsets]
    assert any(name == "dlq" for name, *_ in with_offsets.records)
    # The ledger view takes this record back instead of parsing it again.
    assert written.take("t1") == record


async def test_record_returns_only_once_the_transaction_committed() -> None:
    producer, accounting = FakeProducer(), FakeAccounting()
    producer.slow_commit = asyncio.Event()
    stage, _ = committer(producer, accounting)
    runner = asyncio.create_task(stage.run())
    uploaded = batch(["a"])
    recording = asyncio.create_task(
        recorded(stage, LedgerAppend(ledger_record("t1", ["a"]), uploaded))
    )
    flushing = asyncio.create_task(stage.flush())
    await asyncio.sleep(0.05)
    assert not recording.done()
    assert not flushing.done()
    assert producer.committed == []
    producer.slow_commit.set()
    await asyncio.wait_for(asyncio.gather(recording, flushing), 1)
    assert len(producer.committed) == 1
    await stage.close()
    await runner


async def test_a_rejected_batch_dead_letters_each_event_once_and_a_result_tombstones() -> None:
    producer, accounting = FakeProducer(), FakeAccounting()
    stage, _ = committer(producer, accounting)
    runner = asyncio.create_task(stage.run())
    refused = batch(["a", "b"])
    rejection = Rejected(400, {"scm_data": ["bad"]}, '{"scm_data": ["bad"]}')
    await stage.submit(ApiRejection(refused, rejection))
    await stage.submit(ApiRejection(refused, rejection))  # the same events again: once
    forgotten: list[str] = []
    entry = ledger_record("t9", ["c"])
    outcome = task_outcome(
        entry, api_task("t9", TaskApiState.COMPLETE, 1), published_at=datetime.now(UTC)
    )
    await stage.submit(TaskFinished(outcome, lambda: forgotten.append("t9")))
    await stage.flush()
    assert len(producer.written("dlq")) == 1
    intent = f"intent:{refused.batch_id}".encode()
    closures = [value for key, value in producer.written("tasks") if key == intent]
    assert [json.loads(v)["outcome"] for v in closures if v] == ["rejected", "rejected"]
    assert [key for key, value in producer.written("tasks") if key == b"t9"] == [b"t9"]
    assert (b"t9", None) in producer.written("tasks")
    assert [key for key, _ in producer.written("out")] == [b"t9"]
    assert forgotten == ["t9"]
    await stage.close()
    await runner


async def test_results_commit_under_the_poller_generation_they_were_polled_under() -> None:
    # A replica paused past its session resumes with a result polled before the pause:
    # committed under the poller group's generation of then, it is fenced if the ledger
    # partition moved meanwhile (the new owner publishes it); input offsets never ride
    # in a result's transaction (it would not be fenced by the input group).
    producer, accounting = FakeProducer(), FakeAccounting()
    stage, _ = committer(producer, accounting)
    runner = asyncio.create_task(stage.run())
    outcomes = {
        task_id: task_outcome(
            ledger_record(task_id, [task_id]),
            api_task(task_id, TaskApiState.COMPLETE, 1),
            published_at=datetime.now(UTC),
        )
        for task_id in ("t1", "t2", "t3")
    }
    old, new = ResultFence("poller-generation-3", 1), ResultFence("poller-generation-4", 2)
    await stage.submit(dead_letter(5))
    await stage.submit(TaskFinished(outcomes["t1"], lambda: None, old))
    await stage.submit(TaskFinished(outcomes["t2"], lambda: None, new))
    await stage.submit(TaskFinished(outcomes["t3"], lambda: None, old))
    await stage.flush()
    by_group = {tuple(t.groups): t for t in producer.committed}
    assert set(by_group) == {
        (config().kafka.group_id,),
        ("poller-generation-3",),
        ("poller-generation-4",),
    }
    assert [key for _, key, _, _ in by_group[("poller-generation-3",)].records if key] == [
        b"t1",
        b"t1",
        b"t3",
        b"t3",
    ]
    assert set(by_group[("poller-generation-4",)].offsets) == {
        TopicPartition(config().kafka.tasks_topic, 2)
    }
    assert all(
        tp.topic == config().kafka.tasks_topic for tp in by_group[("poller-generation-3",)].offsets
    )
    await stage.close()
    await runner


async def test_a_refused_transaction_stops_the_committer_and_resolves_nothing() -> None:
    producer, accounting = FakeProducer(), FakeAccounting()
    producer.fail_commit = True
    stage, _ = committer(producer, accounting)
    runner = asyncio.create_task(stage.run())
    append = LedgerAppend(ledger_record("t1", ["a"]), batch(["a"]))
    await stage.submit(append)
    with pytest.raises(RuntimeError, match="refused"):
        await asyncio.wait_for(runner, 1)
    assert not append.recorded.done()
    assert producer.committed == []


@pytest.mark.parametrize("producer_fenced_too", [False, True])
async def test_a_fenced_transaction_stops_the_incarnation_as_fenced(
    producer_fenced_too: bool,
) -> None:
    # Cut off past the transaction timeout: the group refuses the commit, and the broker
    # has fenced the producer too, so aborting fails. Either way the replica is fenced
    # (restarted in-process), never crashed.
    producer, accounting = FakeProducer(), FakeAccounting()
    producer.fence_commit = True
    producer.fence_abort = producer_fenced_too
    stage, _ = committer(producer, accounting)
    runner = asyncio.create_task(stage.run())
    append = LedgerAppend(ledger_record("t1", ["a"]), batch(["a"]))
    await stage.submit(append)
    with pytest.raises(ReplicaFencedError, match="GroupFencedError"):
        await asyncio.wait_for(runner, 1)
    assert not append.recorded.done()
    assert producer.committed == []
