"""Review of the fix for simulation seed 1560 (a batch given up with its intent open).

`_abandoned` now holds a given-up batch's events behind its intent only when their
offset is below `OffsetBook.next_to_read`, i.e. when intake has read them again since the
partition came back. That is true of the partition's tracker only once `restore` has
reset it at the assignment. An uploader gives its batch up as soon as `revoked()` says
its partitions are not this intake's any more, so intake often learns of it between the
revoke and the assignment: aiokafka's `assignment()` (and the simulation's consumer)
still names the old partitions then, and the tracker still counts what was read before
the revoke. The event is then held behind the intent although it will be read (and held)
again after the assignment, or although its partition goes to another member.

The last three tests are of `_abandoned`'s early return, which this commit left as it
was: a batch given up after its intent was closed by another process (that resolved it)
while the batch was still in flight here.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiokafka import TopicPartition

from devkit.harness import eventually
from service.core.batching import Batch, Source
from service.relay.messages import (
    ApiRejection,
    BatchAbandoned,
    IntakeMessage,
    IntentClosed,
    LedgerCaughtUp,
    TaskRecorded,
)
from service.scantrust.outcomes import Rejected
from tests.unit.relay.fakes import FakeAccounting, FakeProducer, change
from tests.unit.relay.test_committer import committer
from tests.unit.relay.test_intake import Rig, rig, running, values
from tests.unit.relay.test_intents import intent


async def _under_way_when_revoked(subject: Rig, codes: list[str]) -> Batch:
    """The first batch intake hands on (a queued one taken by an uploader, its intent
    written) is still under way when every partition is revoked: the rebalance deadline
    keeps it in flight, the other batches are dropped."""
    await eventually(lambda: subject.queue.batches)
    taken = subject.queue.batches.pop(0)
    assert values([taken]) == [codes]
    assert subject.book.claim_intent(taken.batch_id)
    await subject.intake.partitions_revoked(set(subject.consumer.assigned))
    assert subject.book.is_in_flight(taken.batch_id)
    return taken


async def _dead_letters_of_a_refused_resolution(*, given_up_while_assigning: bool) -> int:
    """The partition comes back to this replica; the uploader gives its batch up before
    intake has restored the partition: between the revoke and the assignment, or
    (`given_up_while_assigning`) while the assignment waits for the committed offsets.
    The intent's resolution is refused by the API: how many dead letters the committer
    writes for the one event."""
    subject = rig(batch_max_values=3, rebalance_timeout_s=0.1)
    tp = TopicPartition("in", 0)
    subject.consumer.append(change(["a", "b", "c"]))
    await subject.intake.partitions_assigned({tp})
    await subject.inbox.tell(LedgerCaughtUp(0))
    offsets_asked = asyncio.Event()
    committed_offsets = subject.admin.list_consumer_group_offsets

    async def slow_offset_fetch(*args: Any, **kwargs: Any) -> Any:
        offsets_asked.set()
        await asyncio.sleep(0.25)
        return await committed_offsets(*args, **kwargs)

    async with running(subject):
        first = await _under_way_when_revoked(subject, ["a", "b", "c"])
        written = intent(["a", "b", "c"], [(0, 0)], batch_id=first.batch_id, resolve_in_s=0.8)
        given_up = BatchAbandoned(first.batch_id, written)
        if given_up_while_assigning:
            subject.admin.list_consumer_group_offsets = slow_offset_fetch  # type: ignore[method-assign]
            assigning = asyncio.create_task(subject.intake.partitions_assigned({tp}))
            await offsets_asked.wait()
            await subject.inbox.tell(given_up)
            await assigning
            await eventually(lambda: not subject.book.is_in_flight(first.batch_id))
        else:
            # Given up at its next step (`owns` is False once `revoked()` ran), and read
            # by intake before the group answers the join.
            await subject.inbox.tell(given_up)
            await asyncio.sleep(0.1)  # intake took the message
            await subject.intake.partitions_assigned({tp})
            await eventually(lambda: not subject.book.is_in_flight(first.batch_id))
        await eventually(lambda: subject.queue.resolutions, timeout_s=3.0)
    (resolution,) = subject.queue.resolutions
    # What the committer does when the API refuses the request sent again.
    producer, accounting = FakeProducer(), FakeAccounting()
    stage, _ = committer(producer, accounting)
    runner = asyncio.create_task(stage.run())
    refusal = Rejected(400, {"scm_data": ["bad"]}, '{"scm_data": ["bad"]}')
    await stage.submit(ApiRejection(resolution.batch, refusal, resolution.sources))
    await stage.flush()
    await stage.close()
    await runner
    return len(producer.written("dlq"))


async def test_a_batch_given_up_before_the_assignment_is_held_once() -> None:
    """Given up between the revoke and the assignment: intake held the event behind the
    intent then (the old tracker had read it), and again when it read it after the
    assignment (`forget` let go of it as in flight). The intent's resolution carries
    the event twice: when the API refuses the request, the committer dead-letters the
    event twice (`_write_rejection` writes each of `batch.events()`, and the two holds
    are two objects)."""
    assert await _dead_letters_of_a_refused_resolution(given_up_while_assigning=False) == 1


async def test_a_batch_given_up_while_the_assignment_restores_is_held_once() -> None:
    """The same while `partitions_assigned` waits for the committed offsets: the new
    assignment names the partition, and `keep_only` kept its old tracker, whose
    `next_to_read` counts the reads before the revoke, until `restore` replaces it."""
    assert await _dead_letters_of_a_refused_resolution(given_up_while_assigning=True) == 1


async def test_a_batch_given_up_before_the_assignment_costs_no_other_partition_its_events() -> None:
    """The partition of the given-up batch's event goes to another member; this replica
    keeps another partition. Intake learnt of the batch given up between the revoke and
    the assignment and held its share of an event cut across batches (value "a") behind
    the intent, as if read again here. When the new owner resolves the intent and closes
    it, the share is read in again (`Claims.still_unsent` knows nothing of a partition not
    tracked) and batched with an event of the partition this replica does own (value
    "d"). The uploaders refuse the batch (`owns`: a partition not this intake's), give
    it up with no intent, and intake forgets it: "d" was read already and is never read
    again, never sent, and its partition's commit point stays below it until the next
    rebalance (for good while the group is stable).
    """
    subject = rig(partitions=2, batch_max_values=2, rebalance_timeout_s=0.1)
    p0, p1 = TopicPartition("in", 0), TopicPartition("in", 1)
    subject.consumer.append(change(["x"]))  # p0 offset 0
    subject.consumer.append(change(["a", "b", "c"]))  # p0 offset 1: cut, "a" with "x"
    await subject.intake.partitions_assigned({p0, p1})
    await subject.inbox.tell(LedgerCaughtUp(0))
    async with running(subject):
        first = await _under_way_when_revoked(subject, ["x", "a"])
        written = intent(
            ["x", "a"], [(0, 0), (0, 1, [0], 3)], batch_id=first.batch_id, resolve_in_s=600
        )
        await subject.inbox.tell(BatchAbandoned(first.batch_id, written))
        await asyncio.sleep(0.1)  # intake took the message
        # The group gives p0 to another member, p1 to this one.
        subject.consumer.assigned = {p1}
        await subject.intake.partitions_assigned({p1})
        await eventually(lambda: not subject.book.is_in_flight(first.batch_id))
        # The new owner of p0 resolved the intent (it found the task) and closed it.
        await subject.inbox.tell(IntentClosed(first.batch_id, ("task-a",)))
        subject.consumer.append(change(["d"]), partition=1)
        await eventually(lambda: any("d" in codes for codes in values(subject.queue.batches)))
        (carrying,) = [b for b in subject.queue.batches if "d" in values([b])[0]]
        if not subject.book.owns(carrying):
            # What the uploader does with a batch whose partitions are not this intake's:
            # the intent write is refused, the batch given up without one.
            await subject.inbox.tell(BatchAbandoned(carrying.batch_id, None))
            await asyncio.sleep(0.3)
    sendable = [b for b in subject.queue.batches if subject.book.owns(b)]
    assert any("d" in codes for codes in values(sendable)), (
        f'"d" never goes in a batch the uploaders may send: {values(subject.queue.batches)}'
    )


async def _closed_elsewhere_then_given_up(*, before_the_assignment: bool) -> Rig:
    """A batch of this replica carries "a" (partition 0) and "b" (partition 1), its intent
    written, when the group gives partition 0 to another member and partition 1 back to
    this one: the batch is kept in flight (its intent) but no longer this intake's. The
    new owner of partition 0 resolves the intent (it finds the task the upload created)
    and closes it, and the ledger view tells intake so before the uploader, still
    looking the batch up, gives it up. `before_the_assignment`: all of that before
    partition 1 is assigned again (else after it was read again, its event skipped as in
    flight). A later event changes "b" to another market (partition 1, offset 1)."""
    subject = rig(partitions=2, batch_max_values=2, rebalance_timeout_s=0.1)
    p0, p1 = TopicPartition("in", 0), TopicPartition("in", 1)
    subject.consumer.append(change(["a"]), partition=0)
    subject.consumer.append(change(["b"]), partition=1)
    await subject.intake.partitions_assigned({p0, p1})
    await subject.inbox.tell(LedgerCaughtUp(0))
    async with running(subject):
        first = await _under_way_when_revoked(subject, ["a", "b"])
        written = intent(["a", "b"], [(0, 0), (1, 0)], batch_id=first.batch_id)
        closed_elsewhere: list[IntakeMessage] = [
            TaskRecorded(
                "task-ab", first.batch_id, {"extended_id": ["a", "b"]}, {"intended_market": "DE"}
            ),
            IntentClosed(first.batch_id, ("task-ab",)),
            BatchAbandoned(first.batch_id, written),
        ]
        if before_the_assignment:
            for message in closed_elsewhere:
                await subject.inbox.tell(message)
            await asyncio.sleep(0.1)  # intake took the messages
        subject.consumer.assigned = {p1}
        await subject.intake.partitions_assigned({p1})
        if before_the_assignment:
            await eventually(lambda: not subject.book.is_in_flight(first.batch_id))
        await eventually(lambda: subject.book.next_to_read("in", 1) == 1)
        subject.consumer.append(change(["b"], market="FR"), partition=1)
        await eventually(lambda: subject.book.next_to_read("in", 1) == 2)
        if not before_the_assignment:
            await asyncio.sleep(0.2)
            assert not subject.book.is_done(Source("in", 1, 0)), "skipped as in flight"
            assert subject.queue.batches == [], "the FR change waits behind the batch"
            for message in closed_elsewhere:
                await subject.inbox.tell(message)
            await eventually(lambda: not subject.book.is_in_flight(first.batch_id))
        await asyncio.sleep(0.3)  # a batch the events left open is due after 0.05 s
    return subject


async def test_an_event_a_closed_intent_carried_is_not_sent_again() -> None:
    """The closure came while the batch was in flight here: `IntentClosed` finds no
    intent of another process's open for it (`IntentWatch.closed` returns nothing done),
    and `_abandoned` then returns early (the intent is closed) after `forget` let go of
    the batch's events. Read again after the assignment, "b" (partition 1, offset 0) is
    no longer in flight, not done, not held: it is batched and sent a second time,
    although the task the closure named carries it."""
    subject = await _closed_elsewhere_then_given_up(before_the_assignment=True)
    sent_b = [b for b in subject.queue.batches if ("in", 1, 0) in _positions(b)]
    assert sent_b == [], f'"b" of partition 1 offset 0 sent again: {values(sent_b)}'


async def test_an_event_a_closed_intent_carried_is_accounted() -> None:
    """As above, the batch given up after partition 1 was read again (its event skipped
    as in flight): `forget` leaves the event unaccounted and nothing reads it again or
    marks it done, so partition 1's commit point stays below offset 0 for good (until
    another rebalance, whose re-read then sends "b" again)."""
    subject = await _closed_elsewhere_then_given_up(before_the_assignment=False)
    assert subject.book.is_done(Source("in", 1, 0)), "recorded by the closure, never accounted"


async def test_a_later_change_waits_for_the_task_a_closed_intent_named() -> None:
    """As above: the task the closure named ("task-ab", writing "b" to market DE) runs
    until its tombstone, and its claim passed to it (`LedgerTasks`), so the later change
    of "b" to FR waits behind it. `_abandoned` releases every claim of the batch id
    before it learns that the intent is closed, the task's included: the FR change is
    let out of the order guard and sent while the DE task may still be applied after
    it."""
    subject = await _closed_elsewhere_then_given_up(before_the_assignment=False)
    overtaking = [b for b in subject.queue.batches if ("in", 1, 1) in _positions(b)]
    assert overtaking == [], 'the change of "b" to FR went before task-ab ended'


def _positions(batch: Batch) -> set[tuple[str, int, int]]:
    return {(p.source.topic, p.source.partition, p.source.offset) for p in batch.events()}
