"""Second review of the seed-1560 fixes (the deferred `BatchAbandoned`, own closures).

`InputRebalance.settling` is true from `OffsetBook.revoked()` to the end of the next
assignment's restore. `partitions_revoked` calls `revoked()` only after its settle wait,
which waits for exactly the batches an uploader may give up meanwhile; and it drops the
deferred events (`forget_deferred`) before that wait. A batch given up during the wait is
seen to at once, by the tracker of the assignment that is ending.

An intent another process closed while this process's batch was in flight now counts
what the batch carries as done, but only what a recorded closure carries: a refused
one (no task ids) leaves a cut event's share neither done, nor in flight, nor held.
"""

from __future__ import annotations

import asyncio

from aiokafka import TopicPartition

from devkit.harness import eventually
from service.core.batching import Source
from service.relay.messages import (
    BatchAbandoned,
    IntentClosed,
    LedgerCaughtUp,
)
from tests.unit.relay.fakes import change
from tests.unit.relay.test_intake import rig, running, values
from tests.unit.relay.test_intents import intent
from tests.unit.relay.test_review_1560 import _under_way_when_revoked


async def test_a_batch_given_up_while_a_revoke_waits_for_it_is_held_once() -> None:
    """A batch (one event, its intent written) is kept in flight at a rebalance deadline;
    the partition comes back in a later generation (this member missed one), so the
    batch is no longer this intake's (`owns`) and the event, read again, is skipped as
    in flight. The group rebalances again before the uploader's next step:
    `partitions_revoked` drops the held events, then waits for the batch to settle;
    the uploader gives it up during that wait. `settling` is false until `revoked()`,
    so `_abandoned` runs at once, with the ending assignment's tracker (read past the
    event) and tokens (owned): it holds the event behind the intent, after
    `forget_deferred`. The partition comes back and the event is read and held a second
    time. The intent's resolution carries it twice; refused by the API, the committer
    dead-letters the one event twice. (Had the partition gone to another member, the
    stale hold would be read in again at the closure, as in test_review_1560's third
    test.)"""
    generation = [1]
    subject = rig(batch_max_values=3, rebalance_timeout_s=0.5, generation=lambda: generation[0])
    tp = TopicPartition("in", 0)
    subject.consumer.append(change(["a", "b", "c"]))
    await subject.intake.partitions_assigned({tp})
    await subject.inbox.tell(LedgerCaughtUp(0))
    async with running(subject):
        first = await _under_way_when_revoked(subject, ["a", "b", "c"])
        generation[0] = 3
        await subject.intake.partitions_assigned({tp})
        assert not subject.book.owns(first), "the uploader gives it up at its next step"
        await eventually(lambda: subject.book.next_to_read("in", 0) == 1)
        revoking = asyncio.create_task(subject.intake.partitions_revoked({tp}))
        await asyncio.sleep(0.05)
        assert not revoking.done(), "the revoke waits for the batch in flight"
        written = intent(["a", "b", "c"], [(0, 0)], batch_id=first.batch_id, resolve_in_s=0.8)
        await subject.inbox.tell(BatchAbandoned(first.batch_id, written))
        await revoking
        generation[0] = 4
        await subject.intake.partitions_assigned({tp})
        await eventually(lambda: subject.queue.resolutions, timeout_s=3.0)
    (resolution,) = subject.queue.resolutions
    # The committer dead-letters each of these (`_write_rejection`): two holds, two objects.
    held = [(p.source.partition, p.source.offset) for p in resolution.batch.events()]
    assert held == [(0, 0)], f"the resolution carries the event {len(held)} times"


async def test_a_cut_share_of_an_own_batch_whose_intent_was_refused_elsewhere_is_seen_to() -> None:
    """A batch of this replica carries "x" (partition 0, offset 0) and "a", the first of
    the three values of an event on partition 1 (offset 0), its intent written; the
    batch with "b" and "c" is dropped at the revoke, the first kept in flight. The group
    gives partition 0 to another member, partition 1 back to this one: the event is
    read again without "a" (in flight), and "b", "c" are sent and recorded. The new
    owner of partition 0 resolves the intent; the API refuses it: a closure with no
    task ids. `IntentWatch.closed(own=...)` counts only whole events as done for a
    refused intent, so "a" stays undone; the uploader then gives the batch up and
    `forget` lets go of "a" as in flight; `_abandoned` returns early (closed). Nothing
    reads the event again, holds it, or marks it done: partition 1's commit point stays
    below offset 0 for good (its read-ahead grows until the partition pauses), and the
    next rebalance re-reads it and sends "a" again. Given up before the closure, "a" is
    held behind the intent and read in again at the refusal (sent again)."""
    subject = rig(partitions=2, batch_max_values=2, rebalance_timeout_s=0.1)
    p0, p1 = TopicPartition("in", 0), TopicPartition("in", 1)
    subject.consumer.append(change(["x"]), partition=0)
    subject.consumer.append(change(["a", "b", "c"]), partition=1)
    await subject.intake.partitions_assigned({p0, p1})
    await subject.inbox.tell(LedgerCaughtUp(0))
    async with running(subject):
        first = await _under_way_when_revoked(subject, ["x", "a"])
        written = intent(["x", "a"], [(0, 0), (1, 0, [0], 3)], batch_id=first.batch_id)
        subject.consumer.assigned = {p1}
        await subject.intake.partitions_assigned({p1})
        assert not subject.book.owns(first)
        await eventually(lambda: subject.queue.batches)
        (rest,) = subject.queue.batches
        assert values([rest]) == [["b", "c"]]
        subject.queue.batches.clear()
        subject.book.batch_recorded(rest)
        await subject.inbox.tell(IntentClosed(first.batch_id, ()))
        await subject.inbox.tell(BatchAbandoned(first.batch_id, written))
        await eventually(lambda: not subject.book.is_in_flight(first.batch_id))
        await asyncio.sleep(0.3)  # a batch the share went into is due after 0.05 s
    resent = any("a" in codes for codes in values(subject.queue.batches))
    assert resent or subject.book.is_done(Source("in", 1, 0)), (
        'the event on partition 1 is never accounted for, and "a" never sent again'
    )
