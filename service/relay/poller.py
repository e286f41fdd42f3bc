"""The task poller: follows the unfinished tasks of the ledger partitions this replica
owns, with bulk status calls, and hands each outcome to the committer.

Which ledger partitions a replica owns is decided by a consumer group of its own
(`<group>.task-poller`), so every task is followed by exactly one replica. The
group member fetches nothing (its partitions stay paused): the tasks come from
the ledger view, which reads the whole ledger once for the process.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import json
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal, Protocol

import structlog
from aiokafka import ConsumerRebalanceListener, TopicPartition

from service.core.polling import PollSchedule
from service.core.records import TaskLedgerRecord, TaskOutcome, TaskProgress
from service.core.task_outcomes import task_outcome
from service.metrics import RelayMetrics
from service.relay.committer import Membership
from service.relay.config import RelayConfig, utcnow
from service.relay.health import ApiHealth
from service.relay.messages import LedgerChange, Mailbox, Progress, ResultFence, TaskFinished
from service.relay.ports import GroupMember, StatusApi
from service.scantrust.outcomes import ApiTask, AuthFailed, Misconfigured, TaskApiState, TaskPage

log = structlog.get_logger(__name__)

# A failed task's details in its result stay under this (JSON, UTF-8).
MAX_DETAILS_BYTES: Final = 8 * 1024
# The task view's fields every result already carries in its own fields.
SUMMARY_FIELDS: Final = frozenset(
    {
        "id",
        "state",
        "reference",
        "codes_affected",
        "created_by",
        "created_at",
        "started_at",
        "completed_at",
    }
)

INBOX_WAIT_S: Final = 0.2


class PollerMember(GroupMember, Protocol):
    """The poller's group member; it also tells where each ledger partition ends."""

    async def end_offsets(self, partitions: list[TopicPartition]) -> Mapping[TopicPartition, int]:
        """The high watermark of each partition (read uncommitted)."""


class LedgerPositions(Protocol):
    """How far the ledger view has read and told each ledger partition."""

    def position(self, partition: int) -> int:
        """The next offset the view will read in `partition`."""


class ResultCommitter(Protocol):
    """The committer, as the poller sees it."""

    async def submit(self, item: TaskFinished | Progress) -> None:
        """Queue a result or progress record."""

    async def flush(self) -> None:
        """Wait until everything queued so far is committed."""


class TaskPoller:
    """Known tasks of every ledger partition; the owned ones are scheduled for polling."""

    def __init__(
        self,
        config: RelayConfig,
        *,
        inbox: Mailbox[LedgerChange],
        member: PollerMember,
        ledger: LedgerPositions,
        api: StatusApi,
        committer: ResultCommitter,
        health: ApiHealth,
        metrics: RelayMetrics,
        clock: Callable[[], float],
        wrap_listener: Callable[[ConsumerRebalanceListener], ConsumerRebalanceListener]
        | None = None,
        membership: Membership | None = None,
    ) -> None:
        self._config = config
        self._membership = membership
        self._member = member
        self._wrap_listener = wrap_listener or (lambda listener: listener)
        self._ledger = ledger
        self._api = api
        self._committer = committer
        self._health = health
        self._metrics = metrics
        self._clock = clock
        self._inbox = inbox
        self._tasks: dict[str, TaskLedgerRecord] = {}
        self._partition_of: dict[str, int] = {}
        self._owned: set[int] = set()
        # Which assignment each owned partition came with: a status call's results are
        # published only for partitions held by the same assignment throughout the call.
        self._assignments = itertools.count(1)
        self._assigned_by: dict[int, int] = {}
        # Owned partitions the ledger view has not yet read to where they ended when they
        # were assigned: their tasks are polled only then, or a result the previous owner
        # just published would be published again.
        self._rebuilding: dict[int, int] = {}
        self._unknown_states: dict[str, str] = {}  # task id -> the undocumented state seen
        self.schedule = PollSchedule(
            initial_s=config.tracking.poll_initial_s,
            factor=config.tracking.poll_factor,
            max_s=config.tracking.poll_max_s,
            stuck_after_s=config.tracking.task_stuck_after_s,
            # Rounds gather the tasks of one poll interval into one bulk request.
            gather_s=config.tracking.poll_initial_s,
            round_size=config.api.status_chunk_size,
        )

    async def run(self) -> None:
        """Follow the owned tasks for ever (cancelled at shutdown: polls only read)."""
        listener = self._wrap_listener(_PollerRebalance(self))
        self._member.subscribe([self._config.kafka.tasks_topic], listener=listener)
        while True:
            # Keeps the membership alive; nothing is fetched, the partitions are paused.
            await self._member.getmany(timeout_ms=0)
            self._member.pause(*self._member.assignment())
            positions = {
                partition: self._ledger.position(partition) for partition in self._rebuilding
            }
            for change in await self._inbox.take(INBOX_WAIT_S):
                self._apply(change)
            self._finish_rebuilds(positions)
            due = self.schedule.due(self._clock())
            if due:
                await self._poll(due)

    def _apply(self, change: LedgerChange) -> None:
        if change.record is None:
            self._forget(change.task_id)
        elif change.task_id not in self._tasks:
            self._tasks[change.task_id] = change.record
            self._partition_of[change.task_id] = change.partition
            if change.partition in self._owned and change.partition not in self._rebuilding:
                self._schedule(change.record)

    def _schedule(self, entry: TaskLedgerRecord) -> None:
        age = max(0.0, (utcnow() - entry.submitted_at).total_seconds())
        self.schedule.add(entry.task_id, self._clock(), age_s=age)

    def _forget(self, task_id: str) -> None:
        self._tasks.pop(task_id, None)
        self._partition_of.pop(task_id, None)
        self.schedule.remove(task_id)

    def _finish_rebuilds(self, positions: Mapping[int, int]) -> None:
        for partition, position in positions.items():
            if position >= self._rebuilding.get(partition, position + 1):
                del self._rebuilding[partition]
                for task_id, owner in self._partition_of.items():
                    if owner == partition:
                        self._schedule(self._tasks[task_id])

    # -- rebalances of the poller group -------------------------------------------------

    async def partitions_revoked(self, revoked: Collection[TopicPartition]) -> None:
        """Results being published must land before the new owner rebuilds, or it would
        publish them again: wait (bounded) until the committer has committed them."""
        try:
            async with asyncio.timeout(self._config.batching.rebalance_timeout_s):
                await self._committer.flush()
        except TimeoutError:
            log.warning("poller_revoke_deadline", partitions=sorted(tp.partition for tp in revoked))
        lost = {tp.partition for tp in revoked}
        self._owned -= lost
        for partition in lost:
            self._rebuilding.pop(partition, None)
            self._assigned_by.pop(partition, None)
        for task_id, partition in self._partition_of.items():
            if partition in lost:
                self.schedule.remove(task_id)

    async def partitions_assigned(self, assigned: Collection[TopicPartition]) -> None:
        """Poll the tasks of these partitions once the ledger view has read them to their
        high watermark of now (past whatever the previous owner committed)."""
        if not assigned:
            return
        self._member.pause(*assigned)
        ends = await self._member.end_offsets(sorted(assigned))
        assignment = next(self._assignments)
        for tp in assigned:
            self._owned.add(tp.partition)
            self._rebuilding[tp.partition] = ends.get(tp, 0)
            self._assigned_by[tp.partition] = assignment

    # -- polling ------------------------------------------------------------------------

    async def _poll(self, due: list[str]) -> None:
        """One bulk status call for `due`, and what it says handed on. The membership is
        taken before the call, and each result and progress record is committed under it
        (`ResultFence`): a rebalance of the poller group during the call (reads retry for
        up to two minutes) makes the broker refuse them. And only for tasks whose ledger
        partition this member still holds by the assignment it had before the call: the
        others belong to their new owner, which publishes them after its rebuild."""
        polled = _Polled(
            self._membership.group() if self._membership is not None else None,
            {p: self._assigned_by[p] for p in self._owned - self._rebuilding.keys()},
        )
        page = await self._api.tasks(due)
        now = self._clock()
        if isinstance(page, AuthFailed | Misconfigured):
            self._health.refused("status", page)
        elif isinstance(page, TaskPage):
            self._health.accepted("status")
        if not isinstance(page, TaskPage):
            log.warning("task_poll_failed", outcome=type(page).__name__, tasks=len(due))
            for task_id in due:
                self.schedule.polled(task_id, now)
            return
        seen = {task.id: task for task in page.tasks}
        moved = 0
        for task_id in due:
            task = seen.get(task_id)
            entry = self._tasks.get(task_id)
            if entry is None:
                continue
            if not self._still_held(task_id, polled):
                moved += 1
                continue
            if task is not None and not task.known_state:
                self._note_unknown_state(task)
            if task is None or not task.finished:
                self.schedule.polled(task_id, now)
                if self.schedule.newly_stuck(task_id, now):
                    await self._report_stuck(entry, task, self.schedule.age(task_id, now), polled)
                continue
            self.schedule.finishing(task_id)
            details = await self._failure_details(task) if not task.finished_well else None
            if not self._still_held(task_id, polled):
                moved += 1  # moved while the failure's details were read
                continue
            outcome = task_outcome(entry, task, details, published_at=utcnow())
            self._count(outcome, entry)
            done = functools.partial(self._forget, task_id)
            await self._committer.submit(TaskFinished(outcome, done, self._fence(task_id, polled)))
        if moved:
            log.info("task_poll_partitions_moved", tasks_dropped=moved)

    def _still_held(self, task_id: str, polled: _Polled) -> bool:
        """Whether the task's ledger partition is held now by the assignment it was held by
        when the status call began (not revoked meanwhile, nor revoked and given back)."""
        partition = self._partition_of.get(task_id)
        if partition is None or partition not in polled.assignments:
            return False
        return self._assigned_by.get(partition) == polled.assignments[partition]

    def _note_unknown_state(self, task: ApiTask) -> None:
        """A state the API does not document: kept, counted, logged once per task and
        state, and the task polled on until it reaches a documented end."""
        if self._unknown_states.get(task.id) != task.state:
            self._unknown_states[task.id] = str(task.state)
            self._metrics.task_states_unknown.inc()
            log.warning(
                "task_state_unknown",
                task_id=task.id,
                state=str(task.state)[:100],
                hint="not a documented state; still followed until complete or failed",
            )
        if len(self._unknown_states) > 10_000:  # bounded: forget the oldest half
            for task_id in list(self._unknown_states)[:5_000]:
                del self._unknown_states[task_id]

    async def _failure_details(self, task: ApiTask) -> dict[str, Any] | None:
        """What the API's single view of a failed task says about it ("failed: the errors
        can be interpreted"), bounded; None when it cannot be read now (the result is not
        held back for it)."""
        view = await self._api.task(task.id)
        if not isinstance(view, ApiTask):
            log.warning("task_details_unavailable", task_id=task.id, outcome=type(view).__name__)
            return None
        kept = {
            key: value
            for key, value in view.model_dump(mode="json").items()
            if key not in SUMMARY_FIELDS and value is not None
        }
        return bounded_details(kept)

    def _count(self, outcome: TaskOutcome, entry: TaskLedgerRecord) -> None:
        metrics = self._metrics
        metrics.tasks_finished.labels(outcome.state.value).inc()
        metrics.task_duration.labels(outcome.state.value).observe(
            max(0.0, (outcome.published_at - entry.submitted_at).total_seconds())
        )
        if outcome.short and outcome.shortfall:
            metrics.tasks_short.inc()
            metrics.tasks_short_codes.inc(outcome.shortfall)
        if outcome.over and outcome.excess:
            metrics.tasks_over.inc()
            metrics.tasks_over_codes.inc(outcome.excess)
        log.info(
            "task_finished",
            task_id=outcome.task_id,
            state=outcome.state.value,
            codes_affected=outcome.codes_affected,
            expected_codes=outcome.expected_codes,
            short=outcome.short,
            over=outcome.over,
        )

    async def _report_stuck(
        self, entry: TaskLedgerRecord, task: ApiTask | None, age: float, polled: _Polled
    ) -> None:
        state: Literal["pending", "in-progress", "unknown"] = "unknown"
        if task is not None and task.state is TaskApiState.PENDING:
            state = "pending"
        elif task is not None and task.state is TaskApiState.IN_PROGRESS:
            state = "in-progress"
        log.warning(
            "task_stuck",
            task_id=entry.task_id,
            state=state,
            age_s=round(age),
            reference=entry.reference,
            hint="still followed; its result comes when the API finishes it",
        )
        progress = TaskProgress(
            task_id=entry.task_id,
            state=state,
            stuck=True,
            age_seconds=round(age, 3),
            campaign=entry.campaign,
            reference=entry.reference,
            events=entry.events,
            submitted_at=entry.submitted_at,
            reported_at=utcnow(),
        )
        await self._committer.submit(Progress(progress, self._fence(entry.task_id, polled)))

    def _fence(self, task_id: str, polled: _Polled) -> ResultFence | None:
        """The poller group's generation the task was polled under, for its result."""
        partition = self._partition_of.get(task_id)
        if polled.group is None or partition is None:
            return None
        return ResultFence(polled.group, partition)

    def refresh_gauges(self) -> None:
        """Tasks followed, stuck ones, and the age of the oldest."""
        self._metrics.tasks_pending.set(len(self.schedule))
        self._metrics.tasks_stuck.set(self.schedule.stuck)
        self._metrics.oldest_pending_task_age.set(self.schedule.oldest_age(self._clock()))


@dataclass(frozen=True, slots=True)
class _Polled:
    """What a status call was made under: the poller group's membership (None without
    fencing) and, per ledger partition held and rebuilt, the assignment it came with."""

    group: str | None
    assignments: dict[int, int]


def bounded_details(details: dict[str, Any]) -> dict[str, Any]:
    """`details` as they are when their JSON fits MAX_DETAILS_BYTES, else their start as
    text (a result record must stay small)."""
    text = json.dumps(details, ensure_ascii=False)
    if len(text.encode()) <= MAX_DETAILS_BYTES:
        return details
    cut = text.encode()[:MAX_DETAILS_BYTES].decode(errors="ignore")
    return {"truncated": True, "start": cut}


class _PollerRebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, poller: TaskPoller) -> None:
        self._poller = poller

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self._poller.partitions_revoked(revoked)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        await self._poller.partitions_assigned(assigned)
