"""Second adversarial review of issue 27: the owner's fixes of the first review's
findings (tests/unit/relay/test_review_findings.py), broken. Each test shows one way the
fixed code still sends an event twice or stops a partition for good. They fail on the
reviewed change on purpose (the owner fixes the service)."""

from __future__ import annotations

import asyncio
from typing import Any

from aiokafka import TopicPartition

from devkit.harness import eventually
from service.core.offsets import Progress, encode_progress
from service.relay.book import OffsetBook
from service.relay.messages import IntentOpened, LedgerCaughtUp, Resolution
from tests.unit.relay.fakes import change
from tests.unit.relay.support import dead_letter
from tests.unit.relay.test_intake import Queue, running, values
from tests.unit.relay.test_intents import committer
from tests.unit.relay.test_review_findings import resuming_intake, with_an_orphan

# -- 1. An older progress record with the same commit point passes for the named one ----


class LaggingLedger:
    """A ledger view that has read only an older progress record of the partition so far,
    and whose end offsets cannot be asked for now (a leader moving: KafkaError), as in
    the first review's finding 9."""

    def __init__(self, older: bytes, newer: bytes) -> None:
        self._older, self._newer = older, newer
        self.caught_up = False

    async def end_offsets(self) -> dict[int, int]:
        from aiokafka.errors import KafkaConnectionError

        if not self.caught_up:  # the leader moves, then answers again
            raise KafkaConnectionError("leader not available")
        return {0: 10}

    def has_read_to(self, ends: dict[int, int]) -> bool:
        return self.caught_up

    def partition_stopped(self) -> bool:
        return False

    def progress(self, topic: str, partition: int) -> bytes | None:
        return self._newer if self.caught_up else self._older


async def test_an_older_record_with_the_same_commit_point_is_not_taken_for_the_named_one() -> None:
    """The fix of finding 9 (`Intake._progress_not_read_yet`) waits only when the view
    has no record or one whose commit point is *below* the committed one. But the
    commit point of a partition usually stays put (a hole: an upload under way, an event
    held behind an intent) while the offsets done above it grow, each transaction a new
    record with the same commit point and a new digest: exactly issue 27's interleaved
    backlog. A view that has read only an older of those records passes the check
    (digest differs, commit point equal), the older record is applied, and the events
    the named record says are done are sent again. Here: commit point 0, the older
    record says 1 is done, the committed (named) one says 1 and 2 are."""
    older = encode_progress("in", 0, Progress(0, (1,), {}))
    newer = encode_progress("in", 0, Progress(0, (1, 2), {}))
    ledger = LaggingLedger(older, newer)
    subject = await resuming_intake(ledger, newer, "abcd")
    async with running(subject):
        await asyncio.sleep(0.3)
        ledger.caught_up = True  # the view reads the named record now
        await asyncio.sleep(1.5)  # intake asks where the ledger ends once a second
    assert values(subject.queue.batches) == [["a"], ["d"]], (
        "an event the committed (named) record says is done went again"
    )


# -- 2. A resolution revoked while it waited for room is never handed out again ---------


class FullQueue(Queue):
    """The uploaders' queue, full while the API is slow: a Resolution waits for room
    like a batch (the real queue is one bounded asyncio.Queue for both). `take_queued`
    empties it, as the real one does, and a put after that finds room."""

    def __init__(self) -> None:
        super().__init__(room=100)
        self.open = asyncio.Event()

    async def put(self, batch: Any) -> None:
        await self.open.wait()
        if isinstance(batch, Resolution):
            self.resolutions.append(batch)
        else:
            self.batches.append(batch)

    @property
    def idle(self) -> bool:
        return self.open.is_set()

    def take_queued(self) -> list[Any]:
        self.open.set()
        return super().take_queued()


async def test_a_resolution_revoked_while_waiting_for_room_is_handed_out_again() -> None:
    """Intake hands an orphan intent's Resolution on (`_send`: `handed_on` first, then
    it waits for room in the uploaders' queue, which a slow API keeps full; every
    QUEUE_KEEPALIVE_S it polls the consumer, `getmany(timeout_ms=0)`). The group
    rebalances while `_send` is in that poll (aiokafka runs the listener in its
    coordinator's task, at any await of intake's). The fix of finding 8 keeps the intent
    `resolving` since its batch is "in flight" (`forget_deferred(under_way=
    self._book.is_in_flight)`), although no uploader has it. `_send` then sees the epoch
    moved and forgets the batch (`book.forget`, `_reclaim_intents`), but nothing clears
    `resolving`: `due()` skips the intent for ever, and nobody else resolves it (this
    process owns its first partition). Worse, the Resolution was kept in flight at the
    revoke deadline (`handed_on(intent_in_ledger=True)`), so `restore` held its event's
    offset in flight: the event is skipped when read again (never held, so `due()`
    would not take it either) and `book.forget` leaves the offset pending: the commit
    point stays at it for good."""
    from tests.unit.relay.test_intake import rig, running
    from tests.unit.relay.test_intents import intent

    queue = FullQueue()
    subject = rig(rebalance_timeout_s=0.2, queue=queue)
    tp = TopicPartition("in", 0)
    offset = subject.consumer.append(change(["a"]))
    orphan = intent(["a"], [(0, offset)], resolve_in_s=-1)
    fetch = subject.consumer.getmany
    rebalanced: list[bool] = []

    async def getmany(*partitions: TopicPartition, **kwargs: Any) -> Any:
        if kwargs.get("timeout_ms") == 0 and not rebalanced:
            # `_send`'s keep-alive poll: the coordinator's task rebalances meanwhile.
            rebalanced.append(True)

            async def rebalance() -> None:
                await subject.intake.partitions_revoked({tp})
                await subject.intake.partitions_assigned({tp})

            await asyncio.create_task(rebalance())
        return await fetch(*partitions, **kwargs)

    subject.consumer.getmany = getmany  # type: ignore[method-assign]
    await subject.inbox.tell(IntentOpened(orphan))
    await subject.inbox.tell(LedgerCaughtUp(0))
    async with running(subject):
        await asyncio.sleep(2.0)
    assert rebalanced, "the rebalance never came while the Resolution waited for room"
    handed = [r for r in queue.resolutions if r.intent.batch_id == orphan.batch_id]
    assert handed, "the orphan intent was never handed out again: its partition stops"


# -- 3. Records refused after the partitions moved: only a LedgerAppend is --------------


def _committer(book: OffsetBook) -> Any:
    from tests.unit.relay.fakes import FakeProducer

    producer = FakeProducer()
    return committer(producer, book), producer


def _moved_book() -> tuple[OffsetBook, Any]:
    """A book that owned in:0 in generation 1, handed a batch carrying offset 3 on, and
    after a rebalance whose revoke deadline passed owns only in:1 (generation 3)."""
    from tests.unit.relay.test_review_findings import _batch_at

    book = OffsetBook()
    book.assigned({("in", 0)}, 1)
    book.restore("in", 0, 0, None)
    book.apply("in", 0, None)
    for offset in range(4):
        book.received("in", 0, offset)
    under_way = _batch_at(3, "x")
    book.handed_on(under_way)
    assert book.claim_intent(under_way.batch_id)  # its intent is in the ledger
    book.revoked()
    book.keep_in_flight()
    book.assigned({("in", 1)}, 3)
    book.keep_only({("in", 1)})
    assert not book.owns(under_way)
    return book, under_way


async def test_a_rejection_committed_after_the_partitions_moved_is_refused_like_a_record() -> None:
    """The fix of finding 3 refuses a `LedgerAppend` whose batch is no longer owned
    ("queued before a rebalance, committed after it: the partitions' new owner resolves
    the batch's intent"), but an `ApiRejection` of the same batch goes through: its dead
    letters and the intent's closure are written by a process that no longer owns the
    partition. The new owner, holding the events behind the intent, may have resolved it
    meanwhile (its lookup finds nothing, it sends the request again, it is rejected
    again): every event of the batch is dead-lettered twice."""
    from service.relay.messages import ApiRejection
    from service.scantrust.outcomes import Rejected

    book, under_way = _moved_book()
    stage, producer = _committer(book)
    runner = asyncio.create_task(stage.run())
    rejection = Rejected(400, {"scm_data": ["bad"]}, '{"scm_data": ["bad"]}')
    await stage.submit(ApiRejection(under_way, rejection))
    await asyncio.wait_for(stage.flush(), 2)
    await stage.close()
    await asyncio.wait_for(runner, 2)
    written = [(topic, key) for txn in producer.committed for topic, key, _, _ in txn.records]
    assert written == [], f"written for a batch whose partition moved: {written}"


async def test_a_dead_letter_committed_after_its_partition_moved_is_not_written() -> None:
    """The same for intake's dead letters: one queued before a revoke whose deadline
    passed (the committer slow, finding 10's scenario) is committed after the next
    assignment although its partition went to another member, which reads the record
    again (this process never committed past it) and dead-letters it too."""
    book, _ = _moved_book()
    stage, producer = _committer(book)
    runner = asyncio.create_task(stage.run())
    await stage.submit(dead_letter(2))
    await asyncio.wait_for(stage.flush(), 2)
    await stage.close()
    await asyncio.wait_for(runner, 2)
    written = [(topic, key) for txn in producer.committed for topic, key, _, _ in txn.records]
    assert written == [], f"a dead letter of a partition owned by another member: {written}"


# -- 4. With the ledger's end unknown, the named record can itself be the stale one -----


async def test_a_stale_offset_fetch_is_not_trusted_when_the_ledger_end_is_unknown() -> None:
    """Findings 1 and 9 together. The offset fetch did not wait for the previous
    owner's last transaction (still open then: aiokafka's OffsetFetch v3), so the
    commit point restored (0) names the older record; the ledger's end could not be
    asked (`ledger_end_unknown_at_assignment`), so nothing waits for that transaction.
    `_progress_not_read_yet` sees the view hold exactly the record the commit names and
    applies it at once; the newer record (commit point 2, committed with offset 2) is
    read a moment later and ignored: events 0 and 1 go again. The docstring says the
    wait is sound "even when where the ledger ends could not be asked"; it is not."""
    older = encode_progress("in", 0, Progress(0, (), {}))
    newer = encode_progress("in", 0, Progress(2, (), {}))
    ledger = LaggingLedger(older, newer)
    subject = await resuming_intake(ledger, older, "abc")
    async with running(subject):
        await asyncio.sleep(0.3)
        ledger.caught_up = True  # the previous owner's transaction commits; the view reads it
        await asyncio.sleep(1.5)  # intake asks where the ledger ends once a second
    assert values(subject.queue.batches) == [["c"]], (
        "events the newer committed record covers went again"
    )


# -- 5. A record far ahead of where reading starts: one set entry per offset -------------


def test_a_record_far_ahead_of_the_restored_point_keeps_the_tracker_bounded() -> None:
    """The fix of finding 1 marks every offset in range(restored point, record's commit
    point) done, one by one, in a Python set (`_done_above.update(range(...))`). The
    gap is one transaction's worth in the case it was made for, but nothing bounds it:
    when the group has no committed offset (offsets expire after
    `offsets.retention.minutes`, 7 days by default, of an empty group; a group id
    changed while the ledger stays) intake restores from the log start and the ledger's
    record names a commit point millions of offsets further. Measured: a 3 000 000
    gap takes 1.3 s of the event loop and 435 MB resident; each transaction then sorts
    and encodes those millions again (`progress()`) until reading passes them. The
    module says the tracker stays bounded by the read-ahead bound (50 000 by default)."""
    from service.core.offsets import PartitionOffsets

    tracker = PartitionOffsets()
    tracker.restore(0, None)  # no committed offset: from the log start
    tracker.apply(Progress(500_000, (), {}))
    kept = len(tracker._done_above._members)
    assert kept <= 50_000, f"{kept} offsets held one by one for a record's commit point"


# -- 7. A resolution recorded here, its closure not read back yet, at a rebalance --------


async def test_a_resolution_recorded_before_its_closure_is_read_back_is_not_handed_out_again() -> (
    None
):
    """Found by the simulation (seed 4969): this process resolved an orphan intent and
    recorded the task (its closure in the same transaction), but the ledger view had not
    read the closure back when a rebalance came: `forget_deferred` saw the resolution no
    longer in flight, marked the still-open intent not resolving, and after the
    assignment `due()` handed it out again: the same task adopted and recorded twice,
    with two results."""
    subject, orphan = await with_an_orphan()
    tp = TopicPartition("in", 0)
    async with running(subject):
        await eventually(lambda: subject.queue.resolutions)
        (first,) = subject.queue.resolutions
        subject.queue.resolutions = []
        subject.book.batch_recorded(first.batch)  # the committer wrote record and closure
        await subject.intake.partitions_revoked({tp})
        await subject.intake.partitions_assigned({tp})
        await asyncio.sleep(0.5)
    again = [r for r in subject.queue.resolutions if r.intent.batch_id == orphan.batch_id]
    assert again == [], "an intent resolved here was handed out again before its closure"
