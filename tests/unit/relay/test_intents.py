"""Write-ahead intents (docs/design.md section 11), stage by stage, with no server:
intake holds what an open intent covers and resolves orphans it owns, the uploaders
send only under a committed intent and resolve by lookup first, the committer
closes intents with what they promised and is fenced as a whole."""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from aiokafka import TopicPartition
from prometheus_client import CollectorRegistry

from devkit.harness import eventually
from service.core.batching import Done, PendingEvent, Source
from service.core.parsing import ParsedEvent, parse_event
from service.core.records import IntentOutcome, IntentRecord
from service.metrics import RelayMetrics
from service.relay.book import OffsetBook
from service.relay.committer import Committer, ReplicaFencedError
from service.relay.health import ApiHealth
from service.relay.intents import IntentWatch
from service.relay.ledger import WrittenRecords
from service.relay.messages import (
    ApiRejection,
    Flush,
    IntentClosed,
    IntentOpened,
    LedgerAppend,
    LedgerCaughtUp,
    Resolution,
)
from service.relay.reconcile import api_reference
from service.relay.uploaders import Uploaders
from service.scantrust.outcomes import Expired, TaskApiState
from tests.unit.relay.fakes import (
    FakeAccounting,
    FakeApi,
    FakeProducer,
    Inbox,
    change,
    config,
)
from tests.unit.relay.support import api_task, batch, ledger_record, pending
from tests.unit.relay.test_intake import rig, running
from tests.unit.relay.test_uploaders import Recorder, run_until_drained


def intent(
    values: list[str],
    events: Sequence[tuple[Any, ...]],
    *,
    batch_id: str = "b-orphan",
    resolve_in_s: float = -1.0,
    market: str = "DE",
    constraints: dict[str, list[str]] | None = None,
) -> IntentRecord:
    """An intent for `values` (or `constraints`) covering the events at (partition, offset)
    of topic "in"."""
    now = datetime.now(UTC)
    return IntentRecord.model_validate(
        {
            "batch_id": batch_id,
            "api_reference": f"scm-relay:{batch_id}",
            "written_at": now - timedelta(seconds=60),
            "send_by": now - timedelta(seconds=50),
            "resolve_after": now + timedelta(seconds=resolve_in_s),
            "campaign": None,
            "reference": "",
            "scm_data": {"intended_market": market},
            "constraints": constraints or {"extended_id": values},
            "expected_codes": len(values),
            "events": [_event_source(*event) for event in events],
        }
    )


def _event_source(
    partition: int, offset: int, values: list[int] | None = None, total: int | None = None
) -> dict[str, Any]:
    """An intent's event: whole, or the indexes of its `total` values it carries."""
    source: dict[str, Any] = {"topic": "in", "partition": partition, "offset": offset}
    if values is not None:
        source.update(values=values, total=total)
    return source


def held(values: list[str], partition: int, offset: int) -> PendingEvent:
    event = pending(values, partition=partition)
    event.source = Source("in", partition, offset)
    return event


# -- IntentWatch (pure) ------------------------------------------------------------------


def test_an_open_intent_holds_what_it_covers_and_its_closure_says_what_is_done() -> None:
    watch = IntentWatch()
    # The event at offset 6 was cut across batches: this one carries its value 0 of 2.
    watch.opened(intent(["a", "b", "c"], [(0, 5), (0, 6, [0], 2)]))
    whole, split, elsewhere = held(["a", "b"], 0, 5), held(["c", "z"], 0, 6), held(["a"], 0, 7)
    assert watch.defer(whole)
    assert watch.defer(split)
    assert not watch.defer(elsewhere), "an event the intent does not cover went on hold"
    closed = watch.closed("b-orphan", recorded=True)
    # Done: the whole event, and the value of the cut one it carried.
    assert closed.done == [Done("in", 0, 5), Done("in", 0, 6, (0,), 2)]
    # Only part of this event was in the intent: it is read in again, not lost.
    assert closed.readmit == [split]
    assert len(watch) == 0
    assert not watch.defer(held(["a"], 0, 5)), "a closed intent still holds"


def test_a_closed_intent_is_never_opened_again() -> None:
    """Found by the simulation: a replica paused mid-lookup came back after the new owner
    had resolved and closed its batch's intent, gave the batch up with the intent as it
    knew it, and opened it again here; resolved a second time, its task was recorded
    twice."""
    watch = IntentWatch()
    record = intent(["a"], [(0, 5)])
    assert watch.opened(record)
    watch.closed(record.batch_id, recorded=True)
    assert not watch.opened(record)
    assert len(watch) == 0
    assert not watch.defer(held(["a"], 0, 5))


def test_an_orphan_is_due_only_after_resolve_after_for_the_owner_of_its_first_event() -> None:
    watch = IntentWatch()
    watch.opened(intent(["a", "b"], [(1, 3), (0, 9)], resolve_in_s=30))
    now = datetime.now(UTC)
    mine = {("in", 0), ("in", 1)}
    assert watch.due(now, mine, lambda _: False) == [], "resolved before resolve_after"
    later = now + timedelta(seconds=31)
    assert watch.due(later, {("in", 0)}, lambda _: True) == [], "resolved by a non-owner"
    # The owner, but it has not read the intent's events yet.
    assert watch.due(later, mine, lambda _: False) == []
    watch.defer(held(["a"], 1, 3))
    watch.defer(held(["b"], 0, 9))
    ((resolution, record, sources),) = watch.due(later, mine, lambda _: False)
    assert resolution.batch_id == record.batch_id == "b-orphan"
    assert resolution.constraints() == {"extended_id": ["a", "b"]}
    assert [(s.partition, s.offset) for s in sources] == [(1, 3), (0, 9)]
    assert watch.due(later, mine, lambda _: False) == [], "handed out twice"


def held_several(constraints: dict[str, list[str]], partition: int, offset: int) -> PendingEvent:
    raw = json.dumps({"constraints": constraints, "scm_data": {"intended_market": "DE"}})
    parsed = parse_event(raw.encode())
    assert isinstance(parsed, ParsedEvent)
    return PendingEvent(Source("in", partition, offset), parsed.event, raw.encode(), None, 0.0)


def test_an_intent_carries_an_event_with_several_keys_whole() -> None:
    both = {"extended_id": ["a", "b"], "rfid": ["r"]}
    watch = IntentWatch()
    watch.opened(intent([], [(0, 5)], constraints=both))
    multi = held_several(both, 0, 5)
    assert watch.defer(multi)
    later = datetime.now(UTC) + timedelta(seconds=1)
    ((resolution, _, sources),) = watch.due(later, {("in", 0)}, lambda _: False)
    # Resolved, it is sent again exactly: the event's constraints, every key.
    assert resolution.constraints() == both
    assert [(s.partition, s.offset) for s in sources] == [(0, 5)]
    assert watch.closed("b-orphan", recorded=True).done == [Done("in", 0, 5)]


def test_a_closed_intent_makes_its_events_done_read_or_not_and_is_remembered() -> None:
    """Issue 27, window 5: an event of a closed intent read late (its partition's owner
    paused or behind) was sent again: the closure forgot events not yet held."""
    watch = IntentWatch()
    watch.opened(intent(["a", "b"], [(0, 5), (1, 9)]))
    watch.defer(held(["a"], 0, 5))  # the event at (1, 9) is not read yet
    closed = watch.closed("b-orphan", recorded=True)
    assert closed.done == [Done("in", 0, 5), Done("in", 1, 9)]
    assert closed.readmit == []
    # Remembered for a partition assigned later.
    assert watch.closed_in({("in", 1)}) == [Done("in", 1, 9)]


def test_a_rejected_intent_leaves_the_values_of_a_cut_event_to_send() -> None:
    watch = IntentWatch()
    watch.opened(intent(["a"], [(0, 5), (0, 6, [0], 2)]))
    split = held(["c", "z"], 0, 6)
    watch.defer(split)
    closed = watch.closed("b-orphan", recorded=False)
    assert closed.done == [Done("in", 0, 5)]
    assert closed.readmit == [split]


# -- intake ------------------------------------------------------------------------------


async def test_intake_holds_events_under_an_open_intent_until_it_closes_then_skips_them() -> None:
    subject = rig()
    offset = subject.consumer.append(change(["a"]))
    await subject.inbox.tell(IntentOpened(intent(["a"], [(0, offset)], resolve_in_s=3600)))
    await subject.inbox.tell(LedgerCaughtUp(0))
    later = subject.consumer.append(change(["b"]))
    async with running(subject):
        await eventually(lambda: subject.queue.batches)
        await asyncio.sleep(0.2)
        assert [b.constraints() for b in subject.queue.batches] == [{"extended_id": ["b"]}]
        await subject.inbox.tell(IntentClosed("b-orphan", ("t-of-b-orphan",)))
        await eventually(lambda: subject.book.is_done(Source("in", 0, offset)))
        await eventually(lambda: any(isinstance(i, Flush) for i in subject.committer.items))
    assert len(subject.queue.batches) == 1, "an event of a recorded intent was sent again"
    assert later == offset + 1


async def test_an_event_held_behind_an_intent_keeps_later_changes_to_all_its_codes_back() -> None:
    """Found by the simulation: an event cut across batches, one of which another
    process's intent carries; the event is held behind the intent whole, and a later
    change to one of its values outside the intent went first (the intent claimed only
    its own values), so the older change overwrote the newer one."""
    subject = rig()
    first = subject.consumer.append(change(["a", "b"], "DE"))
    await subject.inbox.tell(IntentOpened(intent(["a"], [(0, first, [0], 2)], resolve_in_s=3600)))
    await subject.inbox.tell(LedgerCaughtUp(0))
    subject.consumer.append(change(["b"], "FR"))  # later, to a value outside the intent
    async with running(subject):
        await asyncio.sleep(0.3)
        assert subject.queue.batches == [], "a later change to b overtook the held event"
        await subject.inbox.tell(IntentClosed("b-orphan", ()))  # rejected: b, a sent again
        await eventually(lambda: len(subject.queue.batches) >= 1)
        await asyncio.sleep(0.3)
    sent = [
        (b.constraints()["extended_id"], b.scm_data["intended_market"])
        for b in subject.queue.batches
    ]
    assert sent[0][1] == "DE", "the held event goes first"
    assert ("FR" in [market for _, market in sent]) is False, "FR waits for DE's task to end"


async def test_intake_hands_an_orphan_it_owns_to_the_uploaders_once_it_is_due() -> None:
    subject = rig()
    offset = subject.consumer.append(change(["a"]))
    orphan = intent(["a"], [(0, offset)], resolve_in_s=0.3)
    await subject.inbox.tell(IntentOpened(orphan))
    await subject.inbox.tell(LedgerCaughtUp(0))
    async with running(subject):
        await asyncio.sleep(0.1)
        assert subject.queue.resolutions == [], "resolved before resolve_after"
        await eventually(lambda: subject.queue.resolutions)
    assert subject.queue.batches == []
    (job,) = subject.queue.resolutions
    assert job.intent == orphan
    assert [(s.partition, s.offset) for s in job.sources] == [(0, offset)]
    assert [p.event.source.offset for p in job.batch.parts] == [offset]


async def test_the_echo_of_intakes_own_intent_holds_nothing() -> None:
    subject = rig()
    await subject.inbox.tell(LedgerCaughtUp(0))
    subject.consumer.append(change(["a"]))
    async with running(subject):
        await eventually(lambda: subject.queue.batches)
        (own,) = subject.queue.batches
        echo = intent(["a"], [(0, 0)], batch_id=own.batch_id, resolve_in_s=-1)
        await subject.inbox.tell(IntentOpened(echo))
        await asyncio.sleep(0.3)
    assert subject.queue.batches == [own]
    assert subject.queue.resolutions == [], "intake resolved its own upload"


# -- uploaders ---------------------------------------------------------------------------


def uploaders(api: FakeApi, recorder: Recorder, **settings: Any) -> Uploaders:
    return Uploaders(
        config(**settings),
        api=api,
        committer=recorder,
        intake=Inbox(),
        health=ApiHealth(),
        metrics=RelayMetrics(CollectorRegistry()),
        rng=random.Random(3),
    )


async def test_every_upload_is_sent_under_a_committed_intent_and_only_before_send_by() -> None:
    api, recorder = FakeApi(script=[Expired(0.0)]), Recorder()
    ready = batch(["a", "b"])
    before = time.time()
    await run_until_drained(uploaders(api, recorder, intent_send_window_s=10), [ready])
    # The first attempt found its intent expired (nothing sent): a fresh one, then sent.
    assert [i.batch_id for i in recorder.intents] == [ready.batch_id] * 2
    first, second = recorder.intents
    assert first.api_reference == api_reference(ready)
    assert first.constraints == ready.constraints()
    assert [(e.partition, e.offset) for e in first.events] == [
        (p.source.partition, p.source.offset) for p in ready.events()
    ]
    assert before + 9 < second.send_by.timestamp() <= time.time() + 10
    assert second.resolve_after > second.send_by
    assert api.sent_by[-1] == second.send_by.timestamp()
    (append,) = recorder.items
    assert isinstance(append, LedgerAppend)
    assert append.sources is None, "the batch's own events account for it"


async def test_a_resolution_adopts_the_task_found_and_sends_nothing() -> None:
    orphan = intent(["a"], [(0, 4), (1, 2)])
    api = FakeApi()
    api.states["t-lost"] = api_task(
        "t-lost", TaskApiState.COMPLETE, reference=orphan.api_reference, age_s=30
    )
    recorder = Recorder()
    from service.relay.intents import resolution_batch

    job = Resolution(resolution_batch(orphan, []), orphan, [Done("in", 0, 4)])
    await run_until_drained(uploaders(api, recorder), [job])  # type: ignore[list-item]
    assert api.uploads == [], "a task already existed, yet the batch was sent again"
    assert recorder.intents == []
    (append,) = recorder.items
    assert append.record.task_id == "t-lost"
    assert append.record.batch_id == orphan.batch_id
    assert [(e.partition, e.offset) for e in append.record.events] == [(0, 4), (1, 2)]
    assert append.sources == [Done("in", 0, 4)]


async def test_a_resolution_with_no_task_found_sends_under_a_new_intent() -> None:
    orphan = intent(["a"], [(0, 4)])
    api, recorder = FakeApi(), Recorder()
    from service.relay.intents import resolution_batch

    job = Resolution(resolution_batch(orphan, []), orphan, [Done("in", 0, 4)])
    await run_until_drained(uploaders(api, recorder), [job])  # type: ignore[list-item]
    (sent,) = api.uploads
    assert sent.reference == orphan.api_reference
    assert sent.constraints == orphan.constraints
    (renewed,) = recorder.intents
    assert (renewed.batch_id, renewed.attempt) == (orphan.batch_id, orphan.attempt + 1)
    (append,) = recorder.items
    assert append.record.task_id == "task-1"


# -- committer ---------------------------------------------------------------------------


class Membership:
    def group(self) -> str:
        return "group-at-generation-7"


def committer(producer: FakeProducer, accounting: FakeAccounting | OffsetBook) -> Committer:
    return Committer(
        config(),
        producer=producer,
        accounting=accounting,
        written=WrittenRecords(),
        metrics=RelayMetrics(CollectorRegistry()),
        membership=Membership(),
    )


async def test_a_transaction_where_no_offset_moved_still_commits_the_last_points() -> None:
    producer, accounting = FakeProducer(), FakeAccounting()
    accounting.last_points = {("in", 0): (12, "")}
    stage = committer(producer, accounting)
    runner = asyncio.create_task(stage.run())
    record = intent(["a"], [(0, 12)])
    from service.relay.messages import IntentWrite

    await stage.write_intent(IntentWrite(record))
    await stage.close()
    await runner
    (transaction,) = producer.committed
    assert transaction.offsets == {TopicPartition("in", 0): (12, "")}
    ((_topic, key, value, _),) = transaction.records
    assert key == b"intent:b-orphan"
    assert json.loads(value or b"")["kind"] == "intent"


async def test_a_fenced_transaction_is_aborted_and_stops_the_relay() -> None:
    producer, accounting = FakeProducer(), FakeAccounting()
    accounting.last_points = {("in", 0): (12, "")}
    producer.fence_commit = True
    stage = committer(producer, accounting)
    runner = asyncio.create_task(stage.run())
    append = LedgerAppend(ledger_record("t1", ["a"]), batch(["a"]))
    await stage.submit(append)
    await stage.submit(ApiRejection(batch(["b"]), _rejected()))
    with pytest.raises(ReplicaFencedError, match="IllegalGeneration"):
        await asyncio.wait_for(runner, 1)
    assert producer.committed == []
    assert len(producer.aborted) == 1
    assert not append.recorded.done()


def _rejected() -> Any:
    from service.scantrust.outcomes import Rejected

    return Rejected(400, {"scm_data": ["bad"]}, "{}")


async def test_a_suspended_committer_starts_no_transaction_until_resumed() -> None:
    producer, accounting = FakeProducer(), FakeAccounting()
    stage = committer(producer, accounting)
    runner = asyncio.create_task(stage.run())
    stage.suspend()
    from service.relay.messages import IntentWrite

    writing = asyncio.create_task(stage.write_intent(IntentWrite(intent(["a"], [(0, 1)]))))
    await asyncio.sleep(0.1)
    assert producer.committed == [], "committed while a rebalance suspended the committer"
    stage.resume()
    await asyncio.wait_for(writing, 1)
    assert len(producer.committed) == 1
    await stage.close()
    await runner


async def test_flush_and_suspend_lets_no_transaction_begin_before_the_suspension() -> None:
    # The revoke callback flushes, then the group rejoins under a new generation: an item
    # queued while the flush commits must wait for the assignment, or it would be
    # committed under the old generation and fence a replica that is no zombie.
    from service.relay.messages import IntentWrite

    producer, accounting = FakeProducer(), FakeAccounting()
    stage = committer(producer, accounting)
    runner = asyncio.create_task(stage.run())
    first = asyncio.create_task(stage.write_intent(IntentWrite(intent(["a"], [(0, 1)]))))
    holding = asyncio.create_task(stage.flush_and_suspend())
    await asyncio.wait_for(asyncio.gather(first, holding), 1)
    committed = len(producer.committed)
    later = asyncio.create_task(stage.write_intent(IntentWrite(intent(["b"], [(0, 2)]))))
    await asyncio.sleep(0.1)
    assert len(producer.committed) == committed, "a transaction began after the suspension"
    stage.resume()
    await asyncio.wait_for(later, 1)
    assert len(producer.committed) == committed + 1
    await stage.close()
    await runner


async def test_the_intent_of_a_batch_revoked_before_it_was_written_is_refused() -> None:
    producer, accounting = FakeProducer(), FakeAccounting()
    accounting.revoked.add("b-orphan")
    stage = committer(producer, accounting)
    runner = asyncio.create_task(stage.run())
    from service.relay.messages import BatchRevokedError, IntentWrite

    with pytest.raises(BatchRevokedError):
        await stage.write_intent(IntentWrite(intent(["a"], [(0, 1)])))
    await stage.close()
    await runner
    assert [r for t in producer.committed for r in t.records] == []


def test_at_a_rebalance_only_batches_with_an_intent_stay_in_flight() -> None:
    from service.relay.book import OffsetBook

    book = OffsetBook()
    sent, unsent = batch(["a"]), batch(["b"])
    book.assigned({(p.event.source.topic, p.event.source.partition) for p in sent.parts}, 1)
    for ready in (sent, unsent):
        for part in ready.parts:
            source = part.event.source
            book.received(source.topic, source.partition, source.offset)
        book.handed_on(ready)
    assert book.claim_intent(sent.batch_id)
    assert book.keep_in_flight() == [unsent.batch_id]
    assert not book.claim_intent(unsent.batch_id), "a revoked batch could still be sent"
    # Assigned again and read again here: the batch under way is skipped, the forgotten
    # one is read anew.
    (sent_source,) = [p.event.source for p in sent.parts]
    (unsent_source,) = [p.event.source for p in unsent.parts]
    first = min(sent_source.offset, unsent_source.offset)
    book.restore(sent_source.topic, sent_source.partition, first, None)
    assert book.received(sent_source.topic, sent_source.partition, sent_source.offset)
    assert not book.received(unsent_source.topic, unsent_source.partition, unsent_source.offset)


def test_a_partition_assigned_again_starts_from_the_groups_commit_point() -> None:
    # Paused past its session, this replica had read offsets 10-19 and 32 (the last in an
    # upload under way, its intent written); the group gave the partition to another
    # member, which committed up to 30, then gave it back. The stale offsets must not hold
    # the commit point for ever; the one under way is skipped and holds it until recorded.
    from service.relay.book import OffsetBook

    book = OffsetBook()
    book.assigned({("in", 0)}, 1)
    under_way = batch(["a"])
    (part,) = under_way.parts
    part.event.source = Source("in", 0, 32)
    for offset in [*range(10, 20), 32]:
        book.received("in", 0, offset)
    book.handed_on(under_way)
    assert book.claim_intent(under_way.batch_id)
    book.keep_in_flight()
    book.keep_only({("in", 0)})
    book.restore("in", 0, 30, None)
    book.apply("in", 0, None)  # its progress record read (there is none)
    for offset in range(30, 35):
        if offset == 32:
            assert book.received("in", 0, offset), "an event under way was read again"
        else:
            assert not book.received("in", 0, offset)
            book.dead_lettered("in", 0, offset)
    assert [point.offset for point in book.checkpoints().values()] == [32]
    book.batch_recorded(under_way)
    assert [point.offset for point in book.checkpoints().values()] == [35], (
        "offsets known from before the assignment hold the commit point"
    )


async def test_a_claim_ends_with_its_task_whatever_order_the_ledger_partitions_are_read_in() -> (
    None
):
    from service.relay.messages import TaskEnded, TaskRecorded

    # The intent and its closure sit in one ledger partition, the task's record and
    # tombstone in another: the view may read the tombstone before the intent.
    subject = rig()
    await subject.inbox.tell(LedgerCaughtUp(0))
    orphan = intent(["a"], [(0, 99)], resolve_in_s=3600)
    await subject.inbox.tell(
        TaskRecorded("t1", orphan.batch_id, {"extended_id": ["a"]}, {"intended_market": "DE"})
    )
    await subject.inbox.tell(TaskEnded("t1"))
    await subject.inbox.tell(IntentOpened(orphan))
    await subject.inbox.tell(IntentClosed(orphan.batch_id, ("t1",)))
    subject.consumer.append(change(["a"], market="FR"))
    async with running(subject):
        await eventually(lambda: subject.queue.batches)
    assert [b.constraints() for b in subject.queue.batches] == [{"extended_id": ["a"]}]


async def test_a_closure_read_before_its_task_record_keeps_the_claim_until_the_task_ends() -> None:
    from service.relay.messages import TaskEnded, TaskRecorded

    subject = rig()
    await subject.inbox.tell(LedgerCaughtUp(0))
    orphan = intent(["a"], [(0, 99)], resolve_in_s=3600)
    await subject.inbox.tell(IntentOpened(orphan))
    await subject.inbox.tell(IntentClosed(orphan.batch_id, ("t1",)))
    subject.consumer.append(change(["a"], market="FR"))
    async with running(subject):
        await asyncio.sleep(0.3)
        assert subject.queue.batches == [], "overtook a task that was still running"
        await subject.inbox.tell(
            TaskRecorded("t1", orphan.batch_id, {"extended_id": ["a"]}, {"intended_market": "DE"})
        )
        await asyncio.sleep(0.2)
        assert subject.queue.batches == []
        await subject.inbox.tell(TaskEnded("t1"))
        await eventually(lambda: subject.queue.batches)


def test_the_ledger_view_takes_back_what_this_process_wrote_in_order() -> None:
    from service.core.records import IntentClosure
    from service.relay.ledger import WrittenRecords

    written = WrittenRecords()
    first, renewed = intent(["a"], [(0, 1)]), intent(["a"], [(0, 1)], resolve_in_s=60)
    closure = IntentClosure(batch_id="b-orphan", outcome=IntentOutcome.RECORDED, task_ids=["t"])
    for entry in (first, renewed, closure):
        written.remember_intent("intent:b-orphan", entry)
    taken = [written.take_intent("intent:b-orphan") for _ in range(4)]
    assert taken == [first, renewed, closure, None]
