"""A batch given up with its intent open, while its partition was just taken back.

Found by the simulation (seed 1560): an event cut across batches; the batch with its
first values was under way, its intent written, when the partition moved away and came
back to the same replica. The uploader then gave the batch up. Intake learnt that
*before* it read the event again, and held the event behind the intent twice: once in
`_abandoned` (as if the re-read had skipped it as in flight) and once when it read it
again (no longer in flight after `forget`). When the intent closed, both copies were
held behind a task on one of their codes; when that task ended both were let in
without a second look, and the event's other values went to the API twice."""

from __future__ import annotations

import asyncio

from aiokafka import TopicPartition

from devkit.harness import eventually
from service.core.batching import Batch, Batcher, PendingEvent, Source
from service.core.parsing import ParsedEvent, parse_event
from service.relay.messages import (
    BatchAbandoned,
    IntentClosed,
    LedgerCaughtUp,
    TaskEnded,
    TaskRecorded,
)
from tests.unit.relay.fakes import change
from tests.unit.relay.test_intake import rig, running, values
from tests.unit.relay.test_intents import intent


def _cut_event(offset: int, codes: list[str]) -> list[Batch]:
    """The batches one event is cut into, one value each."""
    raw = change(codes)
    parsed = parse_event(raw)
    assert isinstance(parsed, ParsedEvent)
    pending = PendingEvent(Source("in", 0, offset), parsed.event, raw, None, 0.0)
    batcher = Batcher(max_values=1, max_keys=1, linger_s=1.0, max_open_batches=10)
    ready, _ = batcher.add(pending, 0.0)
    return ready


async def _given_up_then_closed(*, read_first: bool) -> list[list[str]]:
    """The window; `read_first`: intake reads the event again before it learns that the
    batch was given up (the order `_abandoned` was written for). Returns what was sent."""
    subject = rig(batch_max_values=2)
    tp = TopicPartition("in", 0)
    offset = subject.consumer.append(change(["a", "b", "c"]))
    first = _cut_event(offset, ["a", "b", "c"])[0]
    # Under way with its intent written; the partition moves away and comes back.
    await subject.intake.partitions_assigned({tp})
    subject.book.handed_on(first)
    assert subject.book.claim_intent(first.batch_id)
    await subject.intake.partitions_revoked({tp})
    await subject.intake.partitions_assigned({tp})
    written = intent(["a"], [(0, offset, [0], 3)], batch_id=first.batch_id, resolve_in_s=600)
    # Another replica's unfinished task on code "b".
    await subject.inbox.tell(
        TaskRecorded("task-b", "b-other", {"extended_id": ["b"]}, {"intended_market": "FR"})
    )
    if not read_first:
        await subject.inbox.tell(BatchAbandoned(first.batch_id, written))
    await subject.inbox.tell(LedgerCaughtUp(0))
    async with running(subject):
        await eventually(lambda: subject.consumer.positions[0] == 1)
        if read_first:
            await asyncio.sleep(0.1)
            await subject.inbox.tell(BatchAbandoned(first.batch_id, written))
        # Another process resolved the intent: it found the task of value "a".
        await subject.inbox.tell(IntentClosed(first.batch_id, ("task-a",)))
        await asyncio.sleep(0.1)
        assert subject.queue.batches == [], 'sent while a task on its code "b" runs'
        await subject.inbox.tell(TaskEnded("task-b"))
        await eventually(lambda: subject.queue.batches)
        await asyncio.sleep(0.2)
    return values(subject.queue.batches)


async def test_a_batch_given_up_before_its_event_is_read_again_sends_the_rest_once() -> None:
    assert await _given_up_then_closed(read_first=False) == [["b", "c"]]


async def test_a_batch_given_up_after_its_event_is_read_again_sends_the_rest_once() -> None:
    assert await _given_up_then_closed(read_first=True) == [["b", "c"]]
