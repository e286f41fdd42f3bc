"""The ledger view and the task poller against fake consumers and a fake API: the
ledger is parsed once and told to both; only owned partitions are polled, and only
once read to where they ended at their assignment."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from prometheus_client import CollectorRegistry

from devkit.harness import eventually
from service.core.records import IntentClosure, IntentOutcome, intent_key
from service.metrics import RelayMetrics
from service.relay.committer import Membership
from service.relay.health import ApiHealth
from service.relay.ledger import KnownTasks, LedgerView, WrittenRecords
from service.relay.messages import (
    LedgerCaughtUp,
    LedgerChange,
    Mailbox,
    Progress,
    TaskEnded,
    TaskFinished,
    TaskRecorded,
)
from service.relay.poller import TaskPoller, bounded_details
from service.scantrust.outcomes import ApiTask, AuthFailed, TaskApiState, Unavailable
from tests.unit.relay.fakes import FakeApi, FakeConsumer, FakeMember, Inbox, config
from tests.unit.relay.support import api_task, ledger_record


def ledger_view(
    reader: FakeConsumer,
    written: WrittenRecords,
    intake: Inbox,
    poller: Inbox,
    clock: Any = lambda: 0.0,
) -> LedgerView:
    return LedgerView(
        reader=reader,
        ends=FakeMember(reader.topic, len(reader.logs)),
        written=written,
        intake=intake,
        poller=poller,
        metrics=RelayMetrics(CollectorRegistry()),
        clock=clock,
    )


async def test_the_view_tells_intake_and_poller_each_record_once_then_caught_up() -> None:
    reader = FakeConsumer("tasks", partitions=2)
    reader.append(ledger_record("t1", ["a"]).model_dump_json().encode(), 0, b"t1")
    reader.append(b"{broken", 1, b"t2")
    reader.append(None, 0, b"t1")
    intake, poller = Inbox(), Inbox()
    view = ledger_view(reader, WrittenRecords(), intake, poller)
    task = asyncio.create_task(view.run())
    await asyncio.wait_for(view.caught_up.wait(), 2)
    task.cancel()
    recorded, ended, caught_up = intake.messages
    assert isinstance(recorded, TaskRecorded)
    assert recorded.batch_id == "batch-of-t1"
    assert ended == TaskEnded("t1")
    assert caught_up == LedgerCaughtUp(unfinished_tasks=0)
    assert [(c.partition, c.task_id, c.record is None) for c in poller.messages] == [
        (0, "t1", False),
        (0, "t1", True),
    ]
    assert view.position(0) == 2
    assert view.position(1) == 1


async def test_the_view_answers_where_the_ledger_ends_and_whether_it_has_read_to_there() -> None:
    """The one place intake asks whether the ledger has caught up (catch_up.py): where
    it ends by the poller's member (reading uncommitted), how far the view has read."""
    reader = FakeConsumer("tasks", partitions=2)
    reader.append(ledger_record("t1", ["a"]).model_dump_json().encode(), 0, b"t1")
    ends = FakeMember("tasks", 2)
    for _ in range(3):
        ends.append(None, 1, b"t9")  # the member sees further than the view has read
    view = LedgerView(
        reader=reader,
        ends=ends,
        written=WrittenRecords(),
        intake=Inbox(),
        poller=Inbox(),
        metrics=RelayMetrics(CollectorRegistry()),
        clock=lambda: 0.0,
    )
    assert await view.end_offsets() == {}, "asked before the view started reading"
    task = asyncio.create_task(view.run())
    await asyncio.wait_for(view.caught_up.wait(), 2)
    task.cancel()
    assert await view.end_offsets() == {0: 0, 1: 3}
    assert view.has_read_to({0: 1, 1: 0})
    assert not view.has_read_to({0: 1, 1: 3}), "partition 1 read to 0, not 3"
    assert not view.partition_stopped()


async def test_the_view_notes_every_task_the_ledger_names_as_known() -> None:
    """Task records, tombstones and the closures of intents: what reconciliation must
    never take for another batch's task."""
    reader = FakeConsumer("tasks", partitions=2)
    reader.append(ledger_record("t1", ["a"]).model_dump_json().encode(), 0, b"t1")
    reader.append(None, 0, b"t2")  # its record already compacted away
    closure = IntentClosure(batch_id="b-3", outcome=IntentOutcome.RECORDED, task_ids=["t3"])
    reader.append(closure.model_dump_json().encode(), 1, intent_key("b-3").encode())
    known = KnownTasks()
    view = LedgerView(
        reader=reader,
        ends=FakeMember("tasks", 2),
        written=WrittenRecords(),
        intake=Inbox(),
        poller=Inbox(),
        metrics=RelayMetrics(CollectorRegistry()),
        clock=lambda: 0.0,
        known=known,
    )
    task = asyncio.create_task(view.run())
    await asyncio.wait_for(view.caught_up.wait(), 2)
    task.cancel()
    assert [known.recorded_for_another(t, "b-other") for t in ("t1", "t2", "t3")] == [True] * 3
    assert not known.recorded_for_another("t1", "batch-of-t1")
    assert not known.recorded_for_another("t3", "b-3")
    assert not known.recorded_for_another("t4", "b-other"), "a task never recorded is unknown"


async def test_records_this_process_wrote_are_not_parsed_again() -> None:
    reader = FakeConsumer("tasks")
    written = WrittenRecords()
    own = ledger_record("t1", ["a"])
    written.remember(own)
    reader.append(b"not even json: the view must not parse it", 0, b"t1")
    poller = Inbox()
    view = ledger_view(reader, written, Inbox(), poller)
    task = asyncio.create_task(view.run())
    await asyncio.wait_for(view.caught_up.wait(), 2)
    task.cancel()
    assert poller.messages[0].record is own


async def test_an_undecodable_ledger_batch_stops_its_partition_and_holds_the_catch_up() -> None:
    """A ledger partition the view cannot decode stops where the view had told it; the
    other partition is read whole (the records aiokafka drained from it in the failed call
    are read again), and the view does not say it caught up, so intake reads nothing."""
    reader = FakeConsumer("tasks", partitions=2)
    reader.append(ledger_record("t1", ["a"]).model_dump_json().encode(), 0, b"t1")
    reader.append(ledger_record("t2", ["b"]).model_dump_json().encode(), 1, b"t2")
    reader.append(ledger_record("t3", ["c"]).model_dump_json().encode(), 1, b"t3")
    reader.undecodable[1] = 1
    intake, poller = Inbox(), Inbox()
    now = [0.0]
    view = ledger_view(reader, WrittenRecords(), intake, poller, clock=lambda: now[0])
    task = asyncio.create_task(view.run())
    try:
        await eventually(lambda: len(poller.messages) == 1 and bool(view.stopped))
        await asyncio.sleep(0.3)
        assert not view.caught_up.is_set()
        # t2 came in the same fetch as the bad batch: not told until the batch decodes.
        assert [c.task_id for c in poller.messages] == ["t1"]
        assert view.stopped.reasons() == [
            "ledger partition tasks:1 stopped at offset 1: undecodable record batch "
            "(CorruptRecordException: Invalid CRC)"
        ]
        del reader.undecodable[1]
        now[0] = 61.0
        await asyncio.wait_for(view.caught_up.wait(), 2)
    finally:
        task.cancel()
    assert sorted(c.task_id for c in poller.messages) == ["t1", "t2", "t3"]
    assert not view.stopped


class Positions:
    """How far the ledger view has read each partition, as the test says."""

    def __init__(self) -> None:
        self.read: dict[int, int] = {}

    def position(self, partition: int) -> int:
        return self.read.get(partition, 0)


class Committer:
    """Commits at once: runs each result's `done`."""

    def __init__(self) -> None:
        self.items: list[TaskFinished | Progress] = []
        self.flushes = 0

    async def submit(self, item: TaskFinished | Progress) -> None:
        self.items.append(item)
        if isinstance(item, TaskFinished):
            item.done()

    async def flush(self) -> None:
        self.flushes += 1


@asynccontextmanager
async def poller(
    api: FakeApi,
    member: FakeMember,
    positions: Positions,
    committer: Committer,
    health: ApiHealth | None = None,
    membership: Membership | None = None,
    **settings: Any,
) -> AsyncIterator[Mailbox[LedgerChange]]:
    inbox: Mailbox[LedgerChange] = Mailbox(100)
    stage = TaskPoller(
        config(**settings),
        inbox=inbox,
        member=member,
        ledger=positions,
        api=api,
        committer=committer,
        health=health or ApiHealth(),
        metrics=RelayMetrics(CollectorRegistry()),
        clock=lambda: asyncio.get_running_loop().time(),
        membership=membership,
    )
    task = asyncio.create_task(stage.run())
    await asyncio.sleep(0)
    try:
        yield inbox
    finally:
        task.cancel()


async def test_only_tasks_of_owned_partitions_are_polled_and_each_result_published_once() -> None:
    api = FakeApi()
    api.states["t0"] = api_task("t0", TaskApiState.COMPLETE, 1)
    api.states["t1"] = api_task("t1", TaskApiState.FAILED, 0)
    member, positions, committer = FakeMember("tasks", partitions=2), Positions(), Committer()
    async with poller(api, member, positions, committer) as inbox:
        await member.assign(0)
        await inbox.tell(LedgerChange(0, "t0", ledger_record("t0", ["a"])))
        await inbox.tell(LedgerChange(1, "t1", ledger_record("t1", ["b"])))
        await eventually(lambda: committer.items)
        await asyncio.sleep(0.2)
    (finished,) = committer.items
    assert isinstance(finished, TaskFinished)
    assert (finished.outcome.task_id, finished.outcome.state.value) == ("t0", "complete")
    assert all("t1" not in call for call in api.status_calls), (
        "a task of another replica was polled"
    )


async def test_an_assigned_partition_is_polled_only_once_read_to_its_end() -> None:
    api = FakeApi()
    api.states["t0"] = api_task("t0", TaskApiState.COMPLETE, 1)
    member, positions, committer = FakeMember("tasks"), Positions(), Committer()
    # The partition holds two records (the task, and a tombstone the previous owner wrote).
    member.append(b"task", 0, b"t0")
    member.append(None, 0, b"t0")
    async with poller(api, member, positions, committer) as inbox:
        await inbox.tell(LedgerChange(0, "t0", ledger_record("t0", ["a"])))
        await member.assign(0)
        positions.read[0] = 1  # the view has told the task but not yet its tombstone
        await asyncio.sleep(0.2)
        assert api.status_calls == [], "polled before the partition was read to its end"
        await inbox.tell(LedgerChange(0, "t0", None))
        positions.read[0] = 2
        await asyncio.sleep(0.2)
    assert committer.items == [], "a result the previous owner published was published again"


async def test_a_revoke_flushes_results_under_way_and_stops_polling_the_partition() -> None:
    api = FakeApi()
    api.states["t0"] = api_task("t0", TaskApiState.PENDING)
    member, positions, committer = FakeMember("tasks"), Positions(), Committer()
    async with poller(api, member, positions, committer) as inbox:
        await member.assign(0)
        await inbox.tell(LedgerChange(0, "t0", ledger_record("t0", ["a"])))
        await eventually(lambda: api.status_calls)
        await member.assign()
        calls = len(api.status_calls)
        await asyncio.sleep(0.2)
    assert committer.flushes >= 1
    assert len(api.status_calls) == calls, "a revoked partition's task is still polled"


async def test_a_result_polled_before_its_partition_moved_is_not_published() -> None:
    """The poller group moves the ledger partition away while a status call is under way
    (reads retry for up to two minutes): the new owner publishes the result; the old one
    must not publish it too."""
    api = FakeApi(status_delay_s=0.3)
    api.states["t0"] = api_task("t0", TaskApiState.COMPLETE, 1)
    member, positions, committer = FakeMember("tasks"), Positions(), Committer()
    async with poller(api, member, positions, committer, membership=member) as inbox:
        await member.assign(0)
        await inbox.tell(LedgerChange(0, "t0", ledger_record("t0", ["a"])))
        await eventually(lambda: api.status_calls)
        await member.assign()  # the partition goes to another replica mid-call
        await asyncio.sleep(0.5)
    assert committer.items == [], "a result was published by a replica no longer owning it"


async def test_a_result_is_fenced_by_the_generation_it_was_polled_under() -> None:
    """The group moved on during the status call before this member was told (its revoke
    callback not yet run): the result carries the generation from before the call, which
    the broker refuses, not the one read after it."""
    api = FakeApi(status_delay_s=0.3)
    api.states["t0"] = api_task("t0", TaskApiState.COMPLETE, 1)
    member, positions, committer = FakeMember("tasks"), Positions(), Committer()
    async with poller(api, member, positions, committer, membership=member) as inbox:
        await member.assign(0)
        polled_under = member.generation
        await inbox.tell(LedgerChange(0, "t0", ledger_record("t0", ["a"])))
        await eventually(lambda: api.status_calls)
        member.generation += 1
        await eventually(lambda: committer.items)
    (finished,) = committer.items
    assert isinstance(finished, TaskFinished)
    assert finished.fence is not None
    assert finished.fence.group.generation_id == polled_under  # type: ignore[attr-defined]
    assert finished.fence.ledger_partition == 0


async def test_a_failing_status_call_is_retried_on_schedule_until_the_api_answers() -> None:
    api = FakeApi(status_failure=Unavailable("HTTP 503", status=503))
    api.states["t0"] = api_task("t0", TaskApiState.COMPLETE, 1)
    member, positions, committer = FakeMember("tasks"), Positions(), Committer()
    async with poller(api, member, positions, committer) as inbox:
        await member.assign(0)
        await inbox.tell(LedgerChange(0, "t0", ledger_record("t0", ["a"])))
        await eventually(lambda: len(api.status_calls) >= 3)
        assert committer.items == []
        api.status_failure = None
        await eventually(lambda: committer.items)
    (finished,) = committer.items
    assert isinstance(finished, TaskFinished)
    assert finished.outcome.task_id == "t0"


async def test_a_task_unfinished_past_the_stuck_age_is_reported_and_still_followed() -> None:
    api = FakeApi()
    api.states["t0"] = api_task("t0", TaskApiState.IN_PROGRESS)
    member, positions, committer = FakeMember("tasks"), Positions(), Committer()
    async with poller(api, member, positions, committer, task_stuck_after_s=0.2) as inbox:
        await member.assign(0)
        await inbox.tell(LedgerChange(0, "t0", ledger_record("t0", ["a"])))
        await eventually(lambda: committer.items)
        calls = len(api.status_calls)
        await eventually(lambda: len(api.status_calls) > calls)
    (progress,) = committer.items
    assert isinstance(progress, Progress)
    assert (progress.progress.state, progress.progress.stuck) == ("in-progress", True)


async def test_an_undocumented_state_costs_no_other_task_its_result() -> None:
    api = FakeApi()
    api.states["odd"] = ApiTask.model_validate({"id": "odd", "state": "archived"})
    api.states["t0"] = api_task("t0", TaskApiState.COMPLETE, 1)
    member, positions, committer = FakeMember("tasks"), Positions(), Committer()
    async with poller(api, member, positions, committer) as inbox:
        await member.assign(0)
        await inbox.tell(LedgerChange(0, "odd", ledger_record("odd", ["a"])))
        await inbox.tell(LedgerChange(0, "t0", ledger_record("t0", ["b"])))
        await eventually(lambda: committer.items)
        calls = len(api.status_calls)
        await eventually(lambda: len(api.status_calls) > calls)
    (finished,) = committer.items
    assert isinstance(finished, TaskFinished)
    assert finished.outcome.task_id == "t0"
    assert "odd" in api.status_calls[-1], "the task in an undocumented state is no longer followed"


async def test_a_failed_task_s_result_carries_the_api_s_view_and_an_over_count_is_flagged() -> None:
    api = FakeApi()
    api.states["bad"] = ApiTask.model_validate(
        {
            "id": "bad",
            "state": "failed",
            "codes_affected": 0,
            "error": "campaign 11 is archived",
            "details": {"constraints": {"extended_id": ["a"]}, "scm_data": {"x": "1"}},
        }
    )
    api.states["big"] = api_task("big", TaskApiState.COMPLETE, 5)
    member, positions, committer = FakeMember("tasks"), Positions(), Committer()
    async with poller(api, member, positions, committer) as inbox:
        await member.assign(0)
        await inbox.tell(LedgerChange(0, "bad", ledger_record("bad", ["a"])))
        await inbox.tell(LedgerChange(0, "big", ledger_record("big", ["b", "c"])))
        await eventually(lambda: len(committer.items) == 2)
    outcomes = {
        item.outcome.task_id: item.outcome
        for item in committer.items
        if isinstance(item, TaskFinished)
    }
    failed, big = outcomes["bad"], outcomes["big"]
    assert failed.api_details is not None
    assert failed.api_details["error"] == "campaign 11 is archived"
    assert failed.api_details["details"]["scm_data"] == {"x": "1"}
    assert (big.expected_codes, big.excess, big.over, big.short) == (2, 3, True, False)
    assert big.api_details is None


def test_oversized_details_are_cut_to_their_bound() -> None:
    cut = bounded_details({"error": "x" * 100_000})
    assert cut["truncated"] is True
    assert len(json.dumps(cut).encode()) < 9 * 1024
    assert bounded_details({"error": "short"}) == {"error": "short"}


async def test_a_token_refused_only_to_the_poller_stops_intake_and_heals() -> None:
    # No upload is under way: only the status polls see the 403.
    api = FakeApi(status_failure=AuthFailed(403, "forbidden"))
    api.states["t0"] = api_task("t0", TaskApiState.COMPLETE, 1)
    member, positions, committer, health = (
        FakeMember("tasks"),
        Positions(),
        Committer(),
        ApiHealth(),
    )
    async with poller(api, member, positions, committer, health) as inbox:
        await member.assign(0)
        await inbox.tell(LedgerChange(0, "t0", ledger_record("t0", ["a"])))
        await eventually(lambda: health.auth_failed is not None)
        api.status_failure = None  # the token works again
        await eventually(lambda: committer.items)
    assert health.refusal is None, "the refusal outlived the polls that were accepted"
