"""Adversarial review of issue 27's exactly-once fixes: each test shows one way the
change still lets an event go twice, a task be recorded twice, or a partition stop for
good. They fail on the reviewed change on purpose (the owner fixes the service)."""

from __future__ import annotations

import asyncio
from contextlib import suppress
from typing import Any

from aiokafka import TopicPartition
from aiokafka.structs import OffsetAndMetadata

from devkit.harness import eventually
from service.core.batching import Batch, Batcher, PendingEvent, Source
from service.core.offsets import (
    METADATA_PREFIX,
    PartitionOffsets,
    Progress,
    encode_progress,
    progress_digest,
)
from service.core.parsing import ParsedEvent, parse_event
from service.core.records import IntentRecord
from service.relay.book import OffsetBook
from service.relay.intents import carried, resolution_batch
from service.relay.messages import (
    BatchAbandoned,
    BatchRevokedError,
    IntentOpened,
    IntentWrite,
    LedgerAppend,
    LedgerCaughtUp,
    Resolution,
)
from service.relay.uploaders import Uploaders
from service.scantrust.outcomes import Throttled
from tests.unit.relay.fakes import FakeApi, Inbox, change
from tests.unit.relay.support import batch, dead_letter
from tests.unit.relay.test_intake import Rig, rig, running, values
from tests.unit.relay.test_intents import committer, intent
from tests.unit.relay.test_uploaders import Recorder, uploaders

# -- 1. A progress record newer than the commit point the new owner fetched ------------


def test_a_progress_record_newer_than_the_restored_commit_point_counts_below_its_commit() -> None:
    """The previous owner's last transaction committed offset 150 and its progress record
    together, but the new owner fetched the group's offsets before that transaction ended
    (aiokafka's OffsetFetch is v3: no `require_stable`, a pending transactional offset
    commit is not waited for) and restored 100. Its ledger view then reads the newer
    record (the view waits for the ledger's end, open transactions included). Everything
    below 150 is done, as that record was committed with offset 150; `apply` keeps only
    the record's offsets above 150 and the new owner sends 100..149 again."""
    tracker = PartitionOffsets()
    tracker.restore(100, METADATA_PREFIX + "0123456789abcdef")  # the older record's digest
    tracker.apply(Progress(150, (155,), {}))
    resent = [offset for offset in range(100, 150) if not tracker.received(offset)]
    assert resent == [], f"{len(resent)} events below the record's commit point sent again"


class Ledger:
    """The ledger view as intake waits for it: read to its end, with one progress record."""

    def __init__(self, progress: dict[tuple[str, int], bytes]) -> None:
        self._progress = progress

    async def end_offsets(self) -> dict[int, int]:
        return {0: 10}

    def has_read_to(self, ends: dict[int, int]) -> bool:
        return True

    def partition_stopped(self) -> bool:
        return False

    def progress(self, topic: str, partition: int) -> bytes | None:
        return self._progress.get((topic, partition))


async def resuming_intake(ledger: Any, named: bytes, codes: str) -> Rig:
    """Intake over the fakes, one value per batch, with the ledger view given, taking
    over partition 0 (one event per code) whose group offset 0 names the progress record
    `named` by its digest; assigned and told the ledger has caught up."""
    subject = rig(batch_max_values=1, max_open_batches=100, ledger=ledger)
    tp = TopicPartition("in", 0)
    subject.admin.committed[tp] = OffsetAndMetadata(0, METADATA_PREFIX + progress_digest(named))
    for code in codes:
        subject.consumer.append(change([code]))
    await subject.intake.partitions_assigned({tp})
    await subject.inbox.tell(LedgerCaughtUp(0))
    return subject


async def with_an_orphan() -> tuple[Rig, IntentRecord]:
    """Intake (a short revoke deadline) holding one event, "a", at an intent of another
    process's that is open and due to be resolved; told the ledger has caught up."""
    subject = rig(rebalance_timeout_s=0.2)
    offset = subject.consumer.append(change(["a"]))
    orphan = intent(["a"], [(0, offset)], resolve_in_s=-1)
    await subject.inbox.tell(IntentOpened(orphan))
    await subject.inbox.tell(LedgerCaughtUp(0))
    return subject, orphan


async def test_intake_does_not_resend_what_a_newer_committed_progress_record_covers() -> None:
    """The same through intake: the group's offset (fetched while the previous owner's
    last transaction was still open) is 0 and names an older record; the ledger holds the
    newer one, committed with offset 2. Events 0 and 1 are recorded already."""
    older = encode_progress("in", 0, Progress(0, (), {}))
    newer = encode_progress("in", 0, Progress(2, (), {}))
    subject = await resuming_intake(Ledger({("in", 0): newer}), older, "abc")
    async with running(subject):
        await eventually(lambda: subject.queue.batches)
        await asyncio.sleep(0.2)
    assert values(subject.queue.batches) == [["c"]], (
        "events the newer record covers were sent again"
    )


# -- 2. An event held in flight that the other owner finished: the partition stalls -----


def _batch_at(offset: int, code: str) -> Batch:
    raw = change([code])
    parsed = parse_event(raw)
    assert isinstance(parsed, ParsedEvent)
    pending = PendingEvent(Source("in", 0, offset), parsed.event, raw, None, 0.0)
    batcher = Batcher(max_values=1, max_keys=1, linger_s=1.0, max_open_batches=10)
    (ready,), _ = batcher.add(pending, 0.0)
    return ready


def test_an_event_held_in_flight_and_done_by_the_other_owner_does_not_hold_the_commit() -> None:
    """R1's upload of the event at offset 5 is under way (its intent written) when the
    partition moves to R2 (R1's revoke deadline passed). R2 resolves the intent and
    commits offset 5 as done above its commit point 4 (offset 4 waits on another upload).
    The partition comes back to R1 in a later generation: `restore` holds offset 5 in
    flight (before the progress record is applied), `apply` adds 5 to the done set but
    leaves it pending. R1's uploader then finds its batch no longer owned and gives it
    up; its intent is closed already (R2 closed it), so intake forgets the batch
    (`_abandoned`: `opened` is False) and nothing ever accounts offset 5: the commit
    point stays there for good, the partition pauses at its read-ahead bound."""
    book = OffsetBook()
    book.assigned({("in", 0)}, 1)
    book.restore("in", 0, 0, None)
    book.apply("in", 0, None)
    under_way = _batch_at(5, "e")
    for offset in range(6):
        book.received("in", 0, offset)
    book.handed_on(under_way)
    assert book.claim_intent(under_way.batch_id)
    book.revoked()
    book.keep_in_flight()
    book.assigned({("in", 0)}, 3)  # back after another member owned it in generation 2
    book.keep_only({("in", 0)})
    book.restore("in", 0, 4, None)  # R2's commit point
    book.apply("in", 0, Progress(4, (5,), {}))  # R2's record: 5 is done
    assert not book.owns(under_way)
    book.forget([under_way.batch_id])  # BatchAbandoned, its intent closed already
    for offset in range(4, 9):
        if not book.received("in", 0, offset):
            book.dead_lettered("in", 0, offset)
    points = {key: point.offset for key, point in book.checkpoints().items()}
    assert points == {("in", 0): 9}, "an event done by the other owner holds the commit point"


# -- 3. A revoked writer's lookup in flight records the task its new owner records too --


class SlowLookupApi(FakeApi):
    """The first task lookup stays unanswered until `answer` is set (the API is slow:
    the client's retries of a list call last up to two minutes); `looking` is set once
    it is under way."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.looking = asyncio.Event()
        self.answer = asyncio.Event()
        self._held = False

    async def list_tasks(
        self,
        *,
        state: str | None = None,
        reference: str | None = None,
        created_at: str | None = None,
    ) -> Any:
        page = await super().list_tasks(state=state, reference=reference, created_at=created_at)
        if not self._held:
            self._held = True
            self.looking.set()
            await self.answer.wait()
        return page


def _uploaders(
    api: FakeApi, recorder: Recorder, inbox: Inbox, owned: list[bool], **settings: Any
) -> Uploaders:
    return uploaders(api, recorder, inbox, owns=lambda _batch: owned[0], **settings)


def _recorded(recorder: Recorder) -> list[str]:
    return [
        record.task_id
        for item in recorder.items
        if isinstance(item, LedgerAppend)
        for record in (item.record, *item.more)
    ]


async def test_a_lookup_answered_after_the_revoke_does_not_record_the_task_the_new_owner_does() -> (
    None
):
    """R1's upload creates task-1 but its answer is lost; R1 looks it up (the API slow).
    Meanwhile the partition moves to R2, which resolves R1's intent and records task-1.
    R1's lookup then answers: R1 records task-1 too (no ownership check between the
    lookup and the record; the committer writes a `LedgerAppend` unfenced by ownership).
    Two records of one task: after the first's tombstone the second makes the poller
    follow it again and publish its result a second time."""
    api = SlowLookupApi(lost_answers=1)
    owned = [True]
    writer, writer_inbox = Recorder(), Inbox()
    r1 = _uploaders(api, writer, writer_inbox, owned)
    r1_run = asyncio.create_task(r1.run())
    ready = batch(["a"])
    await r1.put(ready)
    await asyncio.wait_for(api.looking.wait(), 5)
    owned[0] = False  # the rebalance: R1's lookup is under way
    # R2, the partition's new owner, resolves R1's open intent.
    (intent,) = writer.intents
    resolver, resolver_inbox = Recorder(), Inbox()
    r2 = _uploaders(api, resolver, resolver_inbox, [True])
    r2_run = asyncio.create_task(r2.run())
    await r2.put(
        Resolution(
            resolution_batch(intent, []), intent, [carried(source) for source in intent.events]
        )
    )
    await eventually(lambda: resolver.items, timeout_s=5)
    api.answer.set()  # R1's lookup answers now
    await asyncio.sleep(0.3)
    await r1.drain([], 1.0, 1.0)
    await r2.drain([], 1.0, 1.0)
    await asyncio.wait_for(asyncio.gather(r1_run, r2_run), 5)
    assert _recorded(resolver) == ["task-1"]
    assert _recorded(writer) == [], "the revoked writer recorded the task its new owner did"
    assert any(isinstance(m, BatchAbandoned) for m in writer_inbox.messages)


# -- 4. A refused renewal gives the batch up as if it had no intent ----------------------


class RefusingRecorder(Recorder):
    """The committer's `claim_intent`: an intent of a batch no longer owned is refused."""

    def __init__(self, owned: list[bool]) -> None:
        super().__init__()
        self._owned = owned

    async def write_intent(self, intent: IntentWrite) -> None:
        if not self._owned[0]:
            raise BatchRevokedError(intent.record.batch_id)
        await super().write_intent(intent)


class ThrottledApi(FakeApi):
    """The first upload is refused with a 429 whose wait outlasts the intent's window;
    the partition is revoked during the wait."""

    def __init__(self, owned: list[bool], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._owned = owned

    async def upload(self, request: Any, **kwargs: Any) -> Any:
        if not self.uploads:
            self.uploads.append(request)
            self._owned[0] = False
            return Throttled(0.3, "{}")
        return await super().upload(request, **kwargs)


async def test_a_batch_given_up_at_a_refused_renewal_names_the_intent_it_wrote() -> None:
    """The upload was sent under intent 0 (a 429 says nothing was created, but an
    ambiguous answer or a 5xx retried the same way leaves it open just as well); during
    the wait the partition moves; the renewal is refused (`BatchRevokedError`) and the
    batch is given up with `intent=None` although intent 0 is open in the ledger. Intake
    then forgets the batch: if the partition came back here, the offsets `restore` held
    in flight stay pending for good (the commit point stops), and this process, which
    ignored the intent's echo as its own, never resolves it."""
    owned = [True]
    recorder, inbox = RefusingRecorder(owned), Inbox()
    api = ThrottledApi(owned)
    stage = _uploaders(api, recorder, inbox, owned, intent_send_window_s=0.1)
    runner = asyncio.create_task(stage.run())
    await stage.put(batch(["a"]))
    await eventually(lambda: inbox.messages, timeout_s=5)
    await stage.drain([], 1.0, 1.0)
    await asyncio.wait_for(runner, 5)
    (abandoned,) = [m for m in inbox.messages if isinstance(m, BatchAbandoned)]
    assert len(recorder.intents) == 1
    assert abandoned.intent is not None, "given up as if no intent of it were open"


# -- 5. The read-ahead bound keeps a resolver from ever reading its intent's events ------


async def test_an_orphan_whose_events_span_past_the_read_ahead_bound_is_still_resolved() -> None:
    """R1 read offsets 0..199 of a partition in one poll (its bound of 100 is checked
    before a poll) and its batch carrying events 0 and 150 was in flight under an intent
    when it died. The new owner R2 shares its polls with other partitions, so each
    returns fewer records of this one (here 50). The event at 0 is held behind the
    intent, so the commit point stays at 0 and the partition pauses at 100; `due()`
    resolves an intent only once every event of it in the resolver's partitions is held,
    and the event at 150 is never read: the intent is never resolved, the commit point
    never moves, the partition is stopped for good."""
    from service.relay.messages import IntentOpened
    from tests.unit.relay.test_intake import rig, running
    from tests.unit.relay.test_intents import intent

    subject = rig(max_read_ahead=100)
    for offset in range(200):
        subject.consumer.append(change([f"code-{offset}"]))
    fetch = subject.consumer.getmany

    async def fewer_per_poll(*partitions: TopicPartition, **kwargs: Any) -> Any:
        kwargs["max_records"] = min(kwargs.get("max_records") or 50, 50)
        return await fetch(*partitions, **kwargs)

    subject.consumer.getmany = fewer_per_poll  # type: ignore[method-assign]
    orphan = intent(["code-0", "code-150"], [(0, 0), (0, 150)], resolve_in_s=0.2)
    await subject.inbox.tell(IntentOpened(orphan))
    await subject.inbox.tell(LedgerCaughtUp(0))
    async with running(subject):
        with suppress(TimeoutError):  # the assertion below says what was not reached
            await eventually(lambda: subject.queue.resolutions, interval_s=0.02)
    read_to = subject.consumer.positions[0]
    assert subject.queue.resolutions, (
        f"the orphan was never resolved: the partition paused at offset {read_to}, "
        "before the intent's event at 150"
    )


# -- 6. Holding an event scans every held event: quadratic under a backlog ---------------


def test_holding_events_in_the_order_they_were_read_scans_nothing() -> None:
    """`OrderGuard.hold` walked the whole held queue for every event it held (looking
    for a later event of the same partition to go before). In a backlog whose changes
    touch codes of unfinished tasks, tens of thousands of events are held: 20 000 took
    about a minute of the event loop (measured: 2 s for 5 000, 12 s for 10 000). Events
    held in the order they were read now go to the end without a scan; one that goes
    before an event of its partition still finds its place."""
    from collections import deque

    from service.core.ordering import Change, OrderGuard

    class CountingDeque(deque[Any]):
        scans = 0

        def __iter__(self) -> Any:
            CountingDeque.scans += 1
            return super().__iter__()

    guard: OrderGuard[int] = OrderGuard()
    guard._held = CountingDeque()
    for number in range(600):
        change_ = Change({"extended_id": (f"code-{number}",)}, {"intended_market": "A"})
        guard.hold(number, change_, ("in", number % 6, number))
    assert CountingDeque.scans == 0, "holding events in order scanned the held queue"
    early = Change({"extended_id": ("code-early",)}, {"intended_market": "A"})
    guard.hold(-1, early, ("in", 0, 3))  # read in again: goes before offset 6 of its partition
    assert CountingDeque.scans == 1
    order = [guard.next_admissible() for _ in range(8)]
    assert order == [0, 1, 2, 3, 4, 5, -1, 6]


# -- 7. A batch given up with its old intent resolves by that intent's resolve_after -----


async def test_a_batch_given_up_is_resolved_by_its_newest_intent_not_by_the_one_it_wrote() -> None:
    """R1's batch was in flight when its partition moved; R2 resolved its intent (no task
    found) and sends it again under a fresh intent (attempt 1, `send_by` ahead). R1's view
    reads that intent while the batch is still in flight here: ignored as R1's own. Then
    R1's uploader gives the batch up with the intent it wrote (attempt 0, long past its
    `resolve_after`), and `IntentWatch.opened` keeps that one. Once the partition is R1's
    again, R1 resolves at once, while R2's request may still be on its way: the lookup
    finds nothing yet, R1 sends the batch a third time, two tasks."""
    from datetime import UTC, datetime, timedelta

    from service.relay.messages import IntentOpened
    from tests.unit.relay.test_intake import rig, running
    from tests.unit.relay.test_intents import intent

    subject = rig()
    offset = subject.consumer.append(change(["a"]))
    under_way = _batch_at(offset, "a")
    subject.book.handed_on(under_way)
    written = intent(["a"], [(0, offset)], batch_id=under_way.batch_id, resolve_in_s=-30)
    now = datetime.now(UTC)
    resent = written.model_copy(
        update={
            "attempt": 1,
            "send_by": now + timedelta(seconds=10),
            "resolve_after": now + timedelta(seconds=75),
        }
    )
    await subject.inbox.tell(IntentOpened(resent))  # R2's, read while in flight here
    await subject.inbox.tell(BatchAbandoned(under_way.batch_id, written))
    await subject.inbox.tell(LedgerCaughtUp(0))
    async with running(subject):
        await asyncio.sleep(0.5)
    assert subject.queue.resolutions == [], (
        "resolved by the intent this process wrote although a newer one allows sending "
        "for 10 s more"
    )


# -- 8. A resolution under way at a revoke deadline is handed out a second time ----------


async def test_an_orphan_is_resolved_once_although_a_rebalance_came_while_it_was_resolved() -> None:
    """Intake hands an orphan intent to an uploader, which starts looking it up (the
    API is down: lookups retry). A rebalance: `IntentWatch.forget_deferred` marks every
    intent not resolving, the revoke's deadline passes with the resolution still under
    way, `keep_in_flight` forgets its batch (no intent of this process's was written
    for it) and releases the intent's claim. The partition is assigned again, its event
    read and held again, and `due()` hands the same intent out once more: two uploaders
    resolve one intent. When the API answers, both find no task and both send the
    batch (two tasks, codes updated twice), or both adopt the one task (recorded twice)."""
    subject, orphan = await with_an_orphan()
    tp = TopicPartition("in", 0)
    started: list[Resolution] = []
    async with running(subject):
        await eventually(lambda: subject.queue.resolutions)
        # An uploader took it and is looking the task up (not queued any more).
        started += subject.queue.resolutions
        subject.queue.resolutions = []
        await subject.intake.partitions_revoked({tp})
        await subject.intake.partitions_assigned({tp})
        await asyncio.sleep(0.5)
    again = [r for r in subject.queue.resolutions if r.intent.batch_id == orphan.batch_id]
    assert len(started) == 1
    assert again == [], "the intent handed out again while its first resolution is under way"


# -- 9. The progress record the commit names is not waited for ---------------------------


class LaggingLedger(Ledger):
    """A ledger view that has not yet read the partition's latest progress record, and
    whose end offsets cannot be asked for right now (a leader moving: KafkaError)."""

    def __init__(self, progress: dict[tuple[str, int], bytes]) -> None:
        super().__init__(progress)
        self.caught_up = False

    async def end_offsets(self) -> dict[int, int]:
        from aiokafka.errors import KafkaConnectionError

        if not self.caught_up:  # the leader moves, then answers again
            raise KafkaConnectionError("leader not available")
        return {0: 10}

    def progress(self, topic: str, partition: int) -> bytes | None:
        return super().progress(topic, partition) if self.caught_up else None


async def test_intake_waits_for_the_progress_record_its_commit_point_names() -> None:
    """The commit metadata names its progress record by digest (`scm-relay:2:<digest>`),
    so a new owner knows exactly which record it needs. When the ledger's end cannot be
    asked for at the assignment (`_ledger_end` returns None, logged as
    `ledger_end_unknown_at_assignment`), intake applies whatever the view has read at
    once, here nothing, and sends again the event the committed record says is done."""
    record = encode_progress("in", 0, Progress(0, (1,), {}))
    ledger = LaggingLedger({("in", 0): record})
    subject = await resuming_intake(ledger, record, "abc")
    async with running(subject):
        await asyncio.sleep(0.3)
        ledger.caught_up = True  # the view reads the record now
        await asyncio.sleep(1.5)  # intake asks where the ledger ends once a second
    assert values(subject.queue.batches) == [["a"], ["c"]], (
        "an event the committed record covers went again"
    )


# -- 10. A flush-and-suspend cut off by the revoke deadline suspends the committer later -


async def test_a_timed_out_flush_does_not_suspend_the_committer_after_resume() -> None:
    """(Present before this change too.) The revoke's deadline passes while
    `flush_and_suspend` waits behind a slow transaction: intake calls `suspend()`, but the
    `Flush(then_suspend=True)` stays queued. At the assignment `resume()` lets it through,
    and the transaction that commits it suspends the committer again, now for good: nothing
    is committed until the next rebalance (uploads wait for their records, intents are
    never written, intake fills up and pauses)."""
    from tests.unit.relay.fakes import FakeAccounting, FakeProducer

    producer, accounting = FakeProducer(), FakeAccounting()
    stage = committer(producer, accounting)
    runner = asyncio.create_task(stage.run())
    producer.slow_commit = asyncio.Event()  # the broker is slow to commit
    await stage.submit(dead_letter(0))
    await asyncio.sleep(0.05)  # its transaction waits for the broker
    try:
        async with asyncio.timeout(0.1):  # intake's revoke deadline
            await stage.flush_and_suspend()
    except TimeoutError:
        stage.suspend()
    producer.slow_commit.set()
    producer.slow_commit = None
    await asyncio.sleep(0.05)
    stage.resume()  # the assignment
    await asyncio.sleep(0.1)  # the stale flush commits
    try:
        await asyncio.wait_for(stage.flush(), 1)
        committing = True
    except TimeoutError:
        committing = False
    stage.resume()  # let close() through either way
    await stage.close()
    await asyncio.wait_for(runner, 2)
    assert committing, "the committer is held again after the assignment"
