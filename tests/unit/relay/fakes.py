"""In-memory stand-ins for what the relay's stages need from Kafka and the API
(service/relay/ports.py): honest enough that each stage runs its real loop."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiokafka import ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import ProducerFenced

from service.core.batching import Batch, Done, Source
from service.core.offsets import Checkpoint
from service.core.resilience import BreakerState
from service.fencing import GroupFencedError, GroupGeneration
from service.kafka import UndecodableRecordsError
from service.relay.config import RelayConfig, wall_time
from service.scantrust.client import UploadRequest, send_window_closed
from service.scantrust.outcomes import (
    ApiTask,
    AuthFailed,
    Expired,
    Failure,
    Misconfigured,
    TaskPage,
    UploadOutcome,
)
from tests.settings_support import relay_config


def config(**overrides: Any) -> RelayConfig:
    """A relay config for stage tests: short linger and polling, small bounds."""
    values: dict[str, Any] = {
        "input_topic": "in",
        "results_topic": "out",
        "dlq_topic": "dlq",
        "tasks_topic": "tasks",
        "group_id": "g",
        "batch_linger_s": 0.05,
        "max_in_flight_requests": 2,
        "poll_initial_s": 0.01,
        "poll_max_s": 0.05,
        "rebalance_timeout_s": 1.0,
        "retry_initial_s": 0.01,
        "retry_max_backoff_s": 0.05,
        "reconcile_after_s": 0.05,
        "list_lag_s": 0.05,
    }
    values.update(overrides)
    return relay_config(**values)


def change(values: list[str], market: str = "DE", **fields: Any) -> bytes:
    """A change event's bytes."""
    document = {
        "constraints": {"extended_id": values},
        "scm_data": {"intended_market": market},
        **fields,
    }
    return json.dumps(document).encode()


@dataclass
class Record:
    """A consumed record."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


class FakeConsumer:
    """Partitions of records; `getmany` hands out what unpaused partitions hold."""

    def __init__(self, topic: str, partitions: int = 1) -> None:
        self.topic = topic
        self.logs: dict[int, list[Record]] = {p: [] for p in range(partitions)}
        self.positions: dict[int, int] = dict.fromkeys(range(partitions), 0)
        self.assigned: set[TopicPartition] = {TopicPartition(topic, p) for p in self.logs}
        self.paused: set[TopicPartition] = set()
        self.polls = 0
        # partition -> offset of a record batch that cannot be decoded (see getmany)
        self.undecodable: dict[int, int] = {}

    def append(self, value: bytes | None, partition: int = 0, key: bytes | None = None) -> int:
        """Add a record; returns its offset."""
        log = self.logs[partition]
        log.append(Record(self.topic, partition, len(log), key, value))
        return len(log) - 1

    async def getmany(
        self, *partitions: TopicPartition, timeout_ms: int = 0, max_records: int | None = None
    ) -> Mapping[TopicPartition, Sequence[Record]]:
        self.polls += 1
        fetched: dict[TopicPartition, list[Record]] = {}
        left = max_records
        for tp in sorted((set(partitions) or self.assigned) & self.assigned - self.paused):
            start = self.positions[tp.partition]
            records = self.logs[tp.partition][start:]
            if left is not None:
                records = records[:left]
            bad = self.undecodable.get(tp.partition)
            if bad is not None and start <= bad < start + len(records):
                # As aiokafka does: partitions drained before in this call have moved on,
                # and their records are lost with the error, as are this one's before it.
                raise UndecodableRecordsError(tp, bad, "CorruptRecordException: Invalid CRC")
            if records:
                fetched[tp] = records
                self.positions[tp.partition] += len(records)
                if left is not None:
                    left -= len(records)
                    if not left:
                        break
        if not fetched:
            await asyncio.sleep(timeout_ms / 1000)
        return fetched

    def assignment(self) -> Collection[TopicPartition]:
        return set(self.assigned)

    def highwater(self, partition: TopicPartition) -> int | None:
        return len(self.logs[partition.partition])

    async def position(self, partition: TopicPartition) -> int:
        return self.positions[partition.partition]

    def pause(self, *partitions: TopicPartition) -> None:
        self.paused |= set(partitions)

    def resume(self, *partitions: TopicPartition) -> None:
        self.paused -= set(partitions)

    async def seek_to_beginning(self, *partitions: TopicPartition) -> bool:
        for tp in partitions:
            self.positions[tp.partition] = 0
        return True

    def seek(self, partition: TopicPartition, offset: int) -> None:
        self.positions[partition.partition] = offset


class FakeMember(FakeConsumer):
    """The poller's group member: assignment as the test decides. It is also its own
    membership (`group()`): every rebalance is a new generation."""

    def __init__(self, topic: str, partitions: int = 1) -> None:
        super().__init__(topic, partitions)
        self.assigned = set()
        self.listener: ConsumerRebalanceListener | None = None
        self.generation = 0

    def group(self) -> str:
        """The group id with the generation a commit would carry now."""
        return GroupGeneration(f"{self.topic}-poller", self.generation, "member-1", None)

    def subscribe(self, topics: list[str], listener: ConsumerRebalanceListener) -> None:
        self.listener = listener

    async def end_offsets(self, partitions: list[TopicPartition]) -> Mapping[TopicPartition, int]:
        return {tp: len(self.logs[tp.partition]) for tp in partitions}

    async def assign(self, *partitions: int) -> None:
        """A rebalance gives this member `partitions` (revoking what it had)."""
        assert self.listener is not None
        await self.listener.on_partitions_revoked(set(self.assigned))
        self.generation += 1
        self.assigned = {TopicPartition(self.topic, p) for p in partitions}
        await self.listener.on_partitions_assigned(set(self.assigned))


@dataclass
class Transaction:
    """What one committed transaction carried."""

    records: list[tuple[str, bytes | None, bytes | None, list[tuple[str, bytes]] | None]]
    offsets: dict[TopicPartition, Any]
    groups: list[str] = field(default_factory=list)


class FakeProducer:
    """A transactional producer that keeps each committed transaction."""

    def __init__(self) -> None:
        self.committed: list[Transaction] = []
        self._open: Transaction | None = None
        self.fail_commit = False
        self.fence_commit = False
        # The broker fenced the producer meanwhile: aborting raises (it aborted already).
        self.fence_abort = False
        self.aborted: list[Transaction] = []
        self.slow_commit: asyncio.Event | None = None

    @property
    def in_transaction(self) -> bool:
        """A transaction is open (begun, not yet committed or aborted)."""
        return self._open is not None

    async def begin_transaction(self) -> None:
        assert self._open is None, "a transaction is already open"
        self._open = Transaction([], {})

    async def send(
        self,
        topic: str,
        value: bytes | None = None,
        key: bytes | None = None,
        partition: int | None = None,
        timestamp_ms: int | None = None,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> Any:
        assert self._open is not None, "send outside a transaction"
        self._open.records.append((topic, key, value, headers))

    async def send_offsets_to_transaction(
        self, offsets: Mapping[TopicPartition, Any], group_id: str
    ) -> None:
        assert self._open is not None
        self._open.offsets.update(offsets)
        self._open.groups.append(group_id)

    async def abort_transaction(self) -> None:
        assert self._open is not None
        if self.fence_abort:
            self._open = None
            raise ProducerFenced()
        self.aborted.append(self._open)
        self._open = None

    async def commit_transaction(self) -> None:
        assert self._open is not None
        if self.fence_commit:
            raise GroupFencedError("group refused generation 1 of member m: IllegalGenerationError")
        if self.slow_commit is not None:
            await self.slow_commit.wait()
        if self.fail_commit:
            self._open = None
            raise RuntimeError("the broker refused the transaction")
        self.committed.append(self._open)
        self._open = None

    def written(self, topic: str) -> list[tuple[bytes | None, bytes | None]]:
        """(key, value) of every committed record of `topic`."""
        return [
            (key, value)
            for transaction in self.committed
            for (name, key, value, _) in transaction.records
            if name == topic
        ]


class FakeAccounting:
    """Records what the committer accounted for."""

    def __init__(self) -> None:
        self.dead: list[tuple[str, int, int]] = []
        self.batches: list[str] = []
        self.sources: list[Done | Source] = []
        self.revoked: set[str] = set()
        self.points: dict[tuple[str, int], tuple[int, str]] = {}
        self.last_points: dict[tuple[str, int], tuple[int, str]] = {}

    def dead_lettered(self, topic: str, partition: int, offset: int) -> None:
        self.dead.append((topic, partition, offset))
        self.points[(topic, partition)] = (offset + 1, "")

    def batch_recorded(self, batch: Batch) -> None:
        self.batches.append(batch.batch_id)

    def claim_intent(self, batch_id: str) -> bool:
        return batch_id not in self.revoked

    def owns(self, batch: Batch) -> bool:
        return batch.batch_id not in self.revoked

    def owns_partition(self, topic: str, partition: int, token: int | None = None) -> bool:
        return True

    def sources_done(self, sources: Iterable[Done | Source]) -> int:
        done = list(sources)
        self.sources.extend(done)
        return len(done)

    def checkpoints(self) -> dict[tuple[str, int], Checkpoint]:
        points, self.points = self.points, {}
        self.last_points.update(points)
        return {
            key: Checkpoint(offset, metadata, f"progress {offset}".encode())
            for key, (offset, metadata) in points.items()
        }

    def fence_points(self) -> dict[tuple[str, int], tuple[int, str]]:
        return dict(self.last_points)


@dataclass
class FakeApi:
    """Scripted upload outcomes (then accepted), and the tasks uploads created.

    `lost_answers`: that many uploads create their task and answer `Ambiguous`.
    `answer_at`: the n-th upload (counting from 1) gets this answer and creates nothing;
    `lose_answer_at`: the n-th upload creates its task and answers `Ambiguous`.
    `upload_delays`: each call waits this long first (a rate limiter's wait), in order.
    An upload is not sent once its intent's send window has closed, as
    `ScantrustClient.upload` decides it (`send_window_closed`)."""

    uploads: list[UploadRequest] = field(default_factory=list)
    sent_by: list[float | None] = field(default_factory=list)
    sent_at: list[float] = field(default_factory=list)  # the event loop's time of each send
    script: list[UploadOutcome | Expired] = field(default_factory=list)
    answer_at: dict[int, UploadOutcome] = field(default_factory=dict)
    lose_answer_at: set[int] = field(default_factory=set)
    upload_delays: list[float] = field(default_factory=list)
    states: dict[str, ApiTask] = field(default_factory=dict)
    status_calls: list[list[str]] = field(default_factory=list)
    status_failure: Failure | None = None
    status_delay_s: float = 0.0
    lookup_failure: Failure | None = None
    # Every task listed twice, as pages that shifted while they were read would show it.
    list_twice: bool = False
    lookups: int = 0
    lost_answers: int = 0
    refusal: AuthFailed | Misconfigured | None = None
    breaker_state: BreakerState = BreakerState.CLOSED
    upload_delay_s: float = 0.0

    def reserve_upload_slot(self) -> None:
        """No slots here: the upload goes when it is made."""
        return None

    async def upload(
        self,
        request: UploadRequest,
        *,
        send_by: float | None = None,
        deadline: float | None = None,
        slot: object = None,
    ) -> Any:
        from service.scantrust.outcomes import Accepted, Ambiguous, TaskApiState

        if self.upload_delay_s:
            await asyncio.sleep(self.upload_delay_s)
        if self.upload_delays:
            await asyncio.sleep(self.upload_delays.pop(0))
        # The client's own rule, on the clocks the relay reads (a test may set the wall one).
        closed = send_window_closed(
            send_by, deadline, wall_time(), asyncio.get_running_loop().time()
        )
        if closed is not None:
            return closed
        self.sent_by.append(send_by)
        self.sent_at.append(asyncio.get_running_loop().time())
        self.uploads.append(request)
        number = len(self.uploads)
        if self.refusal is not None:
            return self.refusal
        if self.script:
            return self.script.pop(0)
        if number in self.answer_at:
            return self.answer_at[number]
        task_id = f"task-{number}"
        details = {"constraints": request.constraints, "scm_data": request.scm_data}
        self.states[task_id] = ApiTask(
            id=task_id,
            state=TaskApiState.PENDING,
            reference=request.reference or "",
            created_at=datetime.now(UTC),
            details=details,
        )
        if number in self.lose_answer_at:
            return Ambiguous("connection reset before the answer")
        if self.lost_answers:
            self.lost_answers -= 1
            return Ambiguous("no answer before timeout")
        return Accepted(task_id)

    async def list_tasks(
        self,
        *,
        state: str | None = None,
        reference: str | None = None,
        created_at: str | None = None,
    ) -> TaskPage | Failure:
        self.lookups += 1
        if self.lookup_failure is not None:
            failure, self.lookup_failure = self.lookup_failure, None
            return failure
        listed = [t for t in self.states.values() if reference is None or t.reference == reference]
        if self.list_twice:
            listed += listed
        # The list view carries no details.
        return TaskPage([t.model_copy(update={"details": None}) for t in listed])

    async def reload_token(self) -> bool:
        return False

    async def me(self, *, retry: bool = True) -> dict[str, Any] | Failure:
        return self.refusal if self.refusal is not None else {"id": 1638}

    async def task(self, task_id: str) -> ApiTask | Failure:
        from service.scantrust.outcomes import Rejected

        found = self.states.get(task_id)
        return found if found is not None else Rejected(404, {"detail": "Not found."}, "")

    async def tasks(self, task_ids: Sequence[str]) -> TaskPage | Failure:
        self.status_calls.append(list(task_ids))
        if self.status_delay_s:
            await asyncio.sleep(self.status_delay_s)
        if self.status_failure is not None:
            return self.status_failure
        return TaskPage([self.states[i] for i in task_ids if i in self.states])


class Inbox:
    """Collects what a stage tells another."""

    def __init__(self) -> None:
        self.messages: list[Any] = []

    async def tell(self, message: Any) -> None:
        self.messages.append(message)


class FakeAdmin:
    """Committed offsets with metadata, and a metadata probe that can fail."""

    def __init__(self) -> None:
        self.committed: dict[TopicPartition, Any] = {}
        self.fail = False

    async def list_consumer_group_offsets(
        self, group_id: str, group_coordinator_id: int | None = None, partitions: Any = None
    ) -> Mapping[TopicPartition, Any]:
        return {tp: self.committed.get(tp) for tp in partitions or []}

    async def list_topics(self) -> list[str]:
        from aiokafka.errors import KafkaConnectionError

        if self.fail:
            raise KafkaConnectionError("connection refused")
        return ["in"]
