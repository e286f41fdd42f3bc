"""Intake against a fake consumer: validation, admission behind the ledger's claims,
pausing, hand-off, rebalances and the shutdown flush, with no broker."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from aiokafka import TopicPartition
from aiokafka.structs import OffsetAndMetadata
from prometheus_client import CollectorRegistry

from devkit.harness import eventually
from service.core.batching import Batch, Batcher, Source
from service.metrics import RelayMetrics
from service.relay.admission import Admission
from service.relay.book import OffsetBook
from service.relay.health import ApiHealth
from service.relay.intake import YIELD_EVERY_RECORDS, Intake
from service.relay.messages import (
    BatchRejected,
    DeadLetter,
    Flush,
    IntakeMessage,
    LedgerCaughtUp,
    Mailbox,
    Resolution,
    TaskEnded,
    TaskRecorded,
)
from tests.unit.relay.fakes import FakeAdmin, FakeConsumer, change, config


class Queue:
    """The uploaders' queue: keeps what intake hands on, with room for `room`."""

    def __init__(self, room: int = 100) -> None:
        self.batches: list[Batch] = []
        self.resolutions: list[Resolution] = []
        self.room = room
        self._space = asyncio.Event()

    async def put(self, batch: Batch | Resolution) -> None:
        if isinstance(batch, Resolution):
            self.resolutions.append(batch)
            return
        while len(self.batches) >= self.room:
            self._space.clear()
            await self._space.wait()
        self.batches.append(batch)

    @property
    def idle(self) -> bool:
        # The uploaders took what came before: only a full queue keeps a batch waiting.
        return len(self.batches) < self.room

    def take_queued(self) -> list[Batch]:
        taken, self.batches = self.batches, []
        taken += [r.batch for r in self.resolutions]
        self.resolutions = []
        self._space.set()
        return taken


class Committer:
    """Collects dead letters; `flush` counts."""

    def __init__(self) -> None:
        self.items: list[DeadLetter | Flush] = []
        self.flushes = 0
        self.suspended = False

    async def submit(self, item: DeadLetter | Flush) -> None:
        self.items.append(item)

    async def flush(self) -> None:
        self.flushes += 1

    async def flush_and_suspend(self) -> None:
        self.flushes += 1
        self.suspended = True

    def suspend(self) -> None:
        self.suspended = True

    def resume(self) -> None:
        self.suspended = False


@dataclass
class Rig:
    intake: Intake
    consumer: FakeConsumer
    inbox: Mailbox[IntakeMessage]
    queue: Queue
    committer: Committer
    book: OffsetBook
    health: ApiHealth
    admin: FakeAdmin
    stop: asyncio.Event = field(default_factory=asyncio.Event)


def rig(
    room: int = 100,
    partitions: int = 1,
    clock: Any = None,
    queue: Queue | None = None,
    generation: Callable[[], int | None] = lambda: None,
    ledger: Any = None,
    **settings: Any,
) -> Rig:
    cfg = config(**settings)
    consumer, inbox, queue, committer = (
        FakeConsumer("in", partitions),
        Mailbox[IntakeMessage](100),
        queue or Queue(room),
        Committer(),
    )
    book, health, admin = OffsetBook(), ApiHealth(), FakeAdmin()
    health.accepted("me")  # the start-up check answered
    batcher = Batcher(
        max_values=cfg.batching.batch_max_values,
        max_keys=1,
        linger_s=cfg.batch_linger_s,
        max_open_batches=cfg.batching.max_open_batches,
    )
    intake = Intake(
        cfg,
        consumer=consumer,
        group_offsets=admin,
        inbox=inbox,
        admission=Admission(batcher),
        book=book,
        uploaders=queue,
        committer=committer,
        health=health,
        metrics=RelayMetrics(CollectorRegistry()),
        clock=clock or (lambda: asyncio.get_running_loop().time()),
        generation=generation,
        ledger=ledger,
    )
    return Rig(intake, consumer, inbox, queue, committer, book, health, admin)


@asynccontextmanager
async def running(subject: Rig) -> AsyncIterator[asyncio.Task[list[Batch]]]:
    task = asyncio.create_task(subject.intake.run(subject.stop))
    try:
        yield task
    finally:
        subject.stop.set()
        await asyncio.wait_for(task, 5)


def values(batches: list[Batch]) -> list[list[str]]:
    return [batch.constraints()["extended_id"] for batch in batches]


async def test_nothing_is_read_before_the_ledger_is_then_batches_are_handed_on() -> None:
    subject = rig(batch_max_values=2)
    subject.consumer.append(change(["a", "b"]))
    subject.consumer.append(change(["c"]))
    async with running(subject):
        await asyncio.sleep(0.2)
        assert subject.intake.paused
        assert subject.consumer.positions[0] == 0
        await subject.inbox.tell(LedgerCaughtUp(0))
        await eventually(lambda: len(subject.queue.batches) == 2)
    # The full batch went at once, the other when its linger passed.
    assert values(subject.queue.batches) == [["a", "b"], ["c"]]
    assert subject.intake.buffered_values == 3, "handed on, not yet recorded"


async def test_an_invalid_record_becomes_a_dead_letter_and_the_stream_goes_on() -> None:
    subject = rig()
    subject.consumer.append(b"{not json")
    subject.consumer.append(change(["a"]))
    await subject.inbox.tell(LedgerCaughtUp(0))
    async with running(subject):
        await eventually(lambda: subject.queue.batches)
    (dead,) = subject.committer.items
    assert isinstance(dead, DeadLetter)
    assert (dead.source.offset, dead.raw, dead.headers.reason.value) == (
        0,
        b"{not json",
        "invalid_json",
    )


async def test_a_change_behind_an_unfinished_task_waits_for_its_tombstone() -> None:
    subject = rig()
    await subject.inbox.tell(
        TaskRecorded("t1", "other-batch", {"extended_id": ["a"]}, {"intended_market": "DE"})
    )
    await subject.inbox.tell(LedgerCaughtUp(1))
    subject.consumer.append(change(["a"], market="FR"))
    subject.consumer.append(change(["b"], market="FR"))
    async with running(subject):
        await eventually(lambda: subject.queue.batches)
        await asyncio.sleep(0.2)
        assert values(subject.queue.batches) == [["b"]], "the change to 'a' overtook the task"
        await subject.inbox.tell(TaskEnded("t1"))
        await eventually(lambda: len(subject.queue.batches) == 2)
    assert values(subject.queue.batches)[1] == ["a"]


async def test_a_rejected_batch_releases_the_events_held_behind_it() -> None:
    subject = rig()
    await subject.inbox.tell(LedgerCaughtUp(0))
    subject.consumer.append(change(["a"], market="DE"))
    async with running(subject):
        await eventually(lambda: subject.queue.batches)
        subject.consumer.append(change(["a"], market="FR"))
        await asyncio.sleep(0.2)
        assert len(subject.queue.batches) == 1
        first = subject.queue.batches[0]
        await subject.inbox.tell(BatchRejected(first.batch_id))
        await eventually(lambda: len(subject.queue.batches) == 2)


async def test_intake_pauses_while_the_api_is_failing_or_the_token_refused() -> None:
    subject = rig()
    await subject.inbox.tell(LedgerCaughtUp(0))
    async with running(subject):
        await eventually(lambda: not subject.intake.paused)
        subject.health.upload_failed()
        await eventually(lambda: subject.intake.paused)
        subject.health.upload_accepted()
        await eventually(lambda: not subject.intake.paused)


async def test_a_full_upload_queue_pauses_intake_but_keeps_it_polling() -> None:
    subject = rig(room=1, batch_max_values=1)
    await subject.inbox.tell(LedgerCaughtUp(0))
    for code in "abc":
        subject.consumer.append(change([code]))
    async with running(subject):
        await eventually(lambda: subject.queue.batches)
        polls = subject.consumer.polls
        await asyncio.sleep(2.5)
        # Still polling (so the group keeps it) while waiting for room, partitions paused.
        assert subject.consumer.polls >= polls + 2
        assert subject.intake.paused
    # Stopped while waiting: the batch that found no room goes to the shutdown flush.


async def test_stop_returns_open_and_unqueued_batches_for_the_flush() -> None:
    subject = rig(room=1, batch_max_values=1, batch_linger_s=60.0)
    await subject.inbox.tell(LedgerCaughtUp(0))
    subject.consumer.append(change(["a"]))
    subject.consumer.append(change(["b"]))
    task = asyncio.create_task(subject.intake.run(subject.stop))
    await eventually(lambda: subject.queue.batches)
    await asyncio.sleep(0.1)
    subject.stop.set()
    final = await asyncio.wait_for(task, 3)
    assert values(subject.queue.batches) == [["a"]]
    assert values(final) == [["b"]]


async def test_a_revoke_drops_unsent_work_and_flushes_the_committer() -> None:
    subject = rig(batch_max_values=1)
    await subject.inbox.tell(LedgerCaughtUp(0))
    subject.consumer.append(change(["a"]))
    async with running(subject):
        await eventually(lambda: subject.queue.batches)
        await subject.intake.partitions_revoked({TopicPartition("in", 0)})
    assert subject.queue.batches == [], "queued, never sent: read again by the next owner"
    assert subject.committer.flushes == 1
    assert subject.intake.buffered_values == 0


async def test_offsets_done_above_the_commit_are_skipped_after_an_assignment() -> None:
    subject = rig(batch_max_values=1)
    tp = TopicPartition("in", 0)
    subject.admin.committed[tp] = OffsetAndMetadata(0, "scm-relay:1:1")
    await subject.intake.partitions_assigned({tp})
    await subject.inbox.tell(LedgerCaughtUp(0))
    for code in "abc":
        subject.consumer.append(change([code]))
    async with running(subject):
        await eventually(lambda: len(subject.queue.batches) == 2)
        await asyncio.sleep(0.1)
    assert values(subject.queue.batches) == [["a"], ["c"]]


async def test_the_commit_point_passes_a_transaction_marker_and_a_commit_is_asked_for() -> None:
    subject = rig()
    subject.consumer.append(b"{not json")
    await subject.inbox.tell(LedgerCaughtUp(0))
    async with running(subject):
        await eventually(lambda: subject.committer.items)
        subject.book.dead_lettered("in", 0, 0)  # the committer wrote it
        # A transactional publisher's commit marker at offset 1: the consumer skips it.
        subject.consumer.positions[0] = 2
        await eventually(lambda: any(isinstance(i, Flush) for i in subject.committer.items))
    assert {k: p.offset for k, p in subject.book.checkpoints().items()} == {("in", 0): 2}


async def test_no_marker_is_passed_while_an_event_is_unaccounted() -> None:
    subject = rig()
    subject.consumer.append(b"{not json")
    await subject.inbox.tell(LedgerCaughtUp(0))
    async with running(subject):
        await eventually(lambda: subject.committer.items)
        subject.consumer.positions[0] = 2
        await asyncio.sleep(0.3)
    assert not any(isinstance(i, Flush) for i in subject.committer.items)
    assert {k: p.offset for k, p in subject.book.checkpoints().items()} == {("in", 0): 0}


async def test_a_long_poll_lets_the_other_stages_run_while_it_is_taken() -> None:
    # A full poll is tens of milliseconds of work; an upload's slot is usable for 10 ms.
    subject = rig(batch_max_values=1000)
    records = 20 * YIELD_EVERY_RECORDS
    for number in range(records):
        subject.consumer.append(change([f"code-{number}"]))
    seen_midway: set[int] = set()

    async def another_stage() -> None:
        while True:
            buffered = subject.intake.buffered_values
            if 0 < buffered < records:
                seen_midway.add(buffered)
            await asyncio.sleep(0)

    watcher = asyncio.create_task(another_stage())
    try:
        async with running(subject):
            await subject.inbox.tell(LedgerCaughtUp(0))
            await eventually(lambda: subject.intake.buffered_values == records)
    finally:
        watcher.cancel()
    assert subject.consumer.polls >= 1
    assert len(seen_midway) >= 10, sorted(seen_midway)


async def test_an_undecodable_batch_stops_its_partition_only_and_loses_nothing() -> None:
    """aiokafka raises the decoding error of one partition after it moved the positions of
    the partitions it drained before in the same call (their records lost with the error):
    intake stops the one partition, reads the others again from the last record it took,
    and tries the stopped one again after the retry wait; nothing is read past the batch
    until it decodes."""
    skew = [0.0]
    subject = rig(
        partitions=2,
        clock=lambda: asyncio.get_running_loop().time() + skew[0],
        batch_max_values=1,
    )
    consumer = subject.consumer
    for n in range(6):
        consumer.append(change([f"a{n}"]), partition=0)
        consumer.append(change([f"b{n}"]), partition=1)
    consumer.undecodable[1] = 3  # sorted after partition 0: drained first, then lost
    await subject.intake.partitions_assigned(set(consumer.assigned))
    await subject.inbox.tell(LedgerCaughtUp(0))
    registry = subject.intake._metrics.registry

    def sent() -> list[str]:
        return sorted(v for batch in subject.queue.batches for v in values([batch])[0])

    def stopped() -> float | None:
        labels = {"topic": "in", "partition": "1"}
        return registry.get_sample_value("scm_relay_partition_stopped", labels)

    async with running(subject) as task:
        await eventually(lambda: sent() == sorted([f"a{n}" for n in range(6)] + ["b0", "b1", "b2"]))
        await asyncio.sleep(0.3)
        assert not task.done()
        assert consumer.positions[1] == 3, "read past the batch that cannot be decoded"
        assert subject.intake.stopped_reasons() == [
            "input partition in:1 stopped at offset 3: undecodable record batch "
            "(CorruptRecordException: Invalid CRC)"
        ]
        assert stopped() == 1
        # Not one offset of partition 1 at or past the batch is accounted for.
        assert not any(subject.book.is_done(Source("in", 1, offset)) for offset in range(3, 6))
        del consumer.undecodable[1]  # the batch decodes now (a fixed log, a new codec)
        skew[0] = 61.0  # past the first retry wait
        await eventually(lambda: len(sent()) == 12)
        await eventually(lambda: stopped() == 0)
    assert subject.intake.stopped_reasons() == []
    assert sorted(sent()) == sorted([f"a{n}" for n in range(6)] + [f"b{n}" for n in range(6)])


async def test_records_a_poll_returns_across_a_rebalance_are_read_again_not_taken() -> None:
    """The partitions were revoked while a poll waited: what it returns is not taken
    (the order guard forgot the events held before the revoke; a later change to a code
    once overtook earlier ones so). Once assigned again, they are read from the start
    the assignment sets, once."""
    subject = rig(batch_max_values=1)
    tp = TopicPartition("in", 0)
    await subject.inbox.tell(LedgerCaughtUp(0))
    subject.consumer.append(change(["a"]))
    subject.consumer.append(change(["b"]))
    polled = subject.consumer.getmany
    revoked = asyncio.Event()

    async def revoked_during_the_poll(*args: Any, **kwargs: Any) -> Any:
        fetched = await polled(*args, **kwargs)
        if fetched and not revoked.is_set():
            await subject.intake.partitions_revoked({tp})
            subject.consumer.assigned = set()  # as aiokafka's: nothing until assigned
            revoked.set()
        return fetched

    subject.consumer.getmany = revoked_during_the_poll  # type: ignore[method-assign]
    async with running(subject):
        await revoked.wait()
        await asyncio.sleep(0.1)
        assert subject.queue.batches == [], "taken although revoked during the poll"
        subject.consumer.assigned = {tp}
        await subject.intake.partitions_assigned({tp})
        await subject.inbox.tell(LedgerCaughtUp(0))
        await eventually(lambda: len(subject.queue.batches) == 2)
        await asyncio.sleep(0.1)
    assert values(subject.queue.batches) == [["a"], ["b"]]
