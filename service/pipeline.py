"""The relay: consume, validate, batch, submit, record, poll, publish (docs/design.md).

One `Relay` runs these stages as tasks of one `asyncio.TaskGroup`; a crash in
any stage cancels the others and surfaces as a non-zero exit.

- intake: reads the input topic (consumer group, manual commits), validates each
  record, holds back changes that would overtake an unfinished one (order
  guard), batches the rest, and pauses its partitions (while still polling)
  whenever a bound is reached or the API is unavailable.
- submitters: send ready batches through the API client and turn each outcome
  into work for the committer.
- committer: the one writer. Each Kafka transaction carries ledger records, dead
  letters, results and tombstones, and the input offsets they release.
- ledger view: reads the whole compacted ledger to know every unfinished task of
  the group (its own and other replicas'), so the order guard holds back changes
  behind them and releases them when their tombstone appears.
- poller: follows the unfinished tasks of the ledger partitions assigned to it
  (its own consumer group), with bulk status calls, and publishes each outcome.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, Literal, NoReturn

import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError
from pydantic import ValidationError

from service.core.batching import Batch, Batcher, FlushReason, PendingEvent, Source
from service.core.contract import ContractLimits, ParsedEvent, Reason, Stage, parse_event
from service.core.offsets import OffsetTracker
from service.core.ordering import Change, OrderGuard
from service.core.polling import PollSchedule
from service.core.records import (
    DeadLetterHeaders,
    TaskLedgerRecord,
    TaskOutcome,
    TaskProgress,
    TaskState,
)
from service.core.resilience import BreakerState
from service.metrics import RelayMetrics
from service.scantrust.client import ScantrustClient, UploadRequest
from service.scantrust.outcomes import (
    Accepted,
    Ambiguous,
    ApiTask,
    AuthFailed,
    Rejected,
    TaskApiState,
    TaskPage,
    Throttled,
    Unavailable,
)

log = structlog.get_logger(__name__)

COMMIT_BATCH_MAX: Final = 500
KAFKA_PROBE_EVERY: Final = 5  # heartbeats (seconds)
KAFKA_PROBE_TIMEOUT_S: Final = 5.0
INTAKE_POLL_MS: Final = 100
# How often intake looks again at a due batch that waits for a free uploader.
LINGER_RECHECK_MS: Final = 20
# While the upload queue is full, intake polls Kafka (partitions paused) this often, well
# inside max.poll.interval.ms.
QUEUE_KEEPALIVE_S: Final = 1.0
RETRY_FLOOR_S: Final = 0.5
RETRY_CEILING_S: Final = 30.0


@dataclass(frozen=True)
class RelayConfig:
    """What the relay needs from the settings."""

    input_topic: str
    results_topic: str
    dlq_topic: str
    tasks_topic: str
    group_id: str
    limits: ContractLimits
    batch_max_values: int = 1000
    batch_max_keys: int = 1
    batch_linger_s: float = 1.0
    max_in_flight_requests: int = 4
    max_open_batches: int = 1000
    max_buffered_values: int = 200_000
    max_unfinished_tasks: int = 200
    shutdown_timeout_s: float = 30.0
    upload_grace_s: float = 30.0
    rebalance_timeout_s: float = 20.0
    poll_initial_s: float = 1.0
    poll_factor: float = 1.5
    poll_max_s: float = 30.0
    task_stuck_after_s: float = 900.0
    status_chunk_size: int = 100


# -- work for the committer ------------------------------------------------------------


@dataclass
class _LedgerAppend:
    record: TaskLedgerRecord
    batch: Batch
    recorded: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


@dataclass
class _DeadLetter:
    source: Source
    raw: bytes
    key: bytes | None
    headers: DeadLetterHeaders


@dataclass
class _ApiRejection:
    batch: Batch
    outcome: Rejected


@dataclass
class _TaskFinished:
    outcome: TaskOutcome
    done: Callable[[], None]


@dataclass
class _Progress:
    progress: TaskProgress


@dataclass
class _Stop:
    pass


_CommitItem = _LedgerAppend | _DeadLetter | _ApiRejection | _TaskFinished | _Progress | _Stop


def utcnow() -> datetime:
    """The wall-clock time, timezone-aware."""
    return datetime.now(UTC)


class Relay:
    """The relay's stages around the pure core; adapters are passed in, started."""

    def __init__(
        self,
        config: RelayConfig,
        *,
        consumer: AIOKafkaConsumer,
        producer: AIOKafkaProducer,
        ledger_reader: AIOKafkaConsumer,
        poller_consumer: AIOKafkaConsumer,
        admin: AIOKafkaAdminClient,
        client: ScantrustClient,
        metrics: RelayMetrics,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.config = config
        self._consumer = consumer
        self._producer = producer
        self._ledger_reader = ledger_reader
        self._poller_consumer = poller_consumer
        self._admin = admin
        self.metrics = metrics
        self.last_beat = 0.0
        self.kafka_reachable = True
        self._poller_state: _PollerState | None = None
        self._client = client
        self._clock = clock or (lambda: asyncio.get_running_loop().time())
        self._batcher = Batcher(
            max_values=config.batch_max_values,
            max_keys=config.batch_max_keys,
            linger_s=config.batch_linger_s,
            max_open_batches=config.max_open_batches,
        )
        self._guard: OrderGuard[PendingEvent] = OrderGuard()
        self._offsets = OffsetTracker()
        self._ready: asyncio.Queue[Batch | None] = asyncio.Queue(
            maxsize=config.max_in_flight_requests * 2
        )
        self._commits: asyncio.Queue[_CommitItem] = asyncio.Queue(maxsize=COMMIT_BATCH_MAX * 4)
        self._in_flight: dict[str, Batch] = {}
        self._api_degraded = False
        self.auth_failed: AuthFailed | None = None
        self._ledger_caught_up = asyncio.Event()
        self._unfinished: dict[str, str] = {}  # task id -> batch id, from the whole ledger
        # Ledger records this process wrote and its ledger view has not read back yet: the
        # view takes them from here instead of parsing them again. Bounded by the records
        # in transactions not yet read (a failed transaction stops the process).
        self._written_ledger: dict[str, TaskLedgerRecord] = {}
        self._stopping = False
        self._paused = False
        # Shutdown: the open batches to flush, handed to submitters after the ready queue.
        self._stop_queue: deque[Batch | None] = deque()
        self._queue_closed = asyncio.Event()
        self._no_new_uploads = False
        self._stop_requested = asyncio.Event()
        self._intake_task: asyncio.Task[Any] | None = None
        self._last_poll = 0.0  # when intake last polled the input consumer (clock time)
        self._rebalances = 0
        self._committing = False

    # -- readiness -----------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """Serving: the ledger is read, the API accepts our token and is not failing."""
        return self._ledger_caught_up.is_set() and self.auth_failed is None

    @property
    def buffered_values(self) -> int:
        """Constraint values read but not yet in a recorded task: open batches, batches
        queued or being uploaded, and events held back."""
        in_flight = sum(batch.size for batch in self._in_flight.values())
        return self._batcher.open_values + in_flight + self._guard.held_values

    def rebalance_listener(self) -> ConsumerRebalanceListener:
        """The listener to subscribe the input consumer with."""
        return _InputRebalance(self)

    # -- run -------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Run every stage until `stop` is set, then shut down in order."""
        async with asyncio.TaskGroup() as group:
            committer = group.create_task(self._committer(), name="committer")
            ledger = group.create_task(self._ledger_view(), name="ledger-view")
            poller = group.create_task(self._poller(), name="poller")
            submitters = [
                group.create_task(self._submitter(), name=f"submitter-{n}")
                for n in range(self.config.max_in_flight_requests)
            ]
            heartbeat = group.create_task(self._heartbeat(), name="heartbeat")
            await self._intake(stop)
            await self._shutdown(submitters)
            self._stopping = True
            await poller
            await self._commits.put(_Stop())
            await committer
            ledger.cancel()
            heartbeat.cancel()

    async def _shutdown(self, submitters: Sequence[asyncio.Task[None]]) -> None:
        """Stop intake, flush open batches and send what the deadline allows.

        At the deadline no new upload starts (queued batches stay unsent and are read
        again at the next start); uploads already under way get `upload_grace_s` more to
        finish, because cancelling one after it was sent would leave a task nobody
        recorded (the duplicate window).
        """
        log.info("relay_stopping", open_batches=self._batcher.open_batches)
        deadline = self._clock() + self.config.shutdown_timeout_s
        for batch in self._batcher.drain(FlushReason.SHUTDOWN):
            self._in_flight[batch.batch_id] = batch
            self._stop_queue.append(batch)
        for _ in submitters:
            self._stop_queue.append(None)
        self._queue_closed.set()
        await asyncio.wait(submitters, timeout=max(0.0, deadline - self._clock()))
        self._no_new_uploads = True
        _, late = await asyncio.wait(submitters, timeout=self.config.upload_grace_s)
        for task in late:
            task.cancel()
        unsent = sum(1 for batch in self._stop_queue if batch is not None)
        if late or unsent:
            log.warning(
                "relay_shutdown_deadline", unsent_batches=unsent, cancelled_uploads=len(late)
            )
        await asyncio.gather(*late, return_exceptions=True)

    # -- heartbeat and gauges ----------------------------------------------------------

    async def _heartbeat(self) -> None:
        """Proves the event loop runs (/healthz), refreshes the gauges once a second, and
        asks Kafka for its metadata every few seconds (readiness)."""
        beats = 0
        while True:
            self.last_beat = self._clock()
            if beats % KAFKA_PROBE_EVERY == 0:
                await self.probe_kafka()
            await self._refresh_gauges()
            beats += 1
            await asyncio.sleep(1.0)

    async def probe_kafka(self) -> None:
        """One metadata request, bounded: the client libraries reconnect silently, so
        reachability is asked, not inferred."""
        try:
            await asyncio.wait_for(self._admin.list_topics(), KAFKA_PROBE_TIMEOUT_S)
        except (KafkaError, OSError, TimeoutError) as exc:
            if self.kafka_reachable:
                log.error("kafka_unreachable", error=f"{type(exc).__name__}: {exc}")
            self.kafka_reachable = False
            return
        if not self.kafka_reachable:
            log.info("kafka_reachable_again")
        self.kafka_reachable = True

    def readiness(self) -> list[str]:
        """Why the relay is not ready; empty when it is."""
        reasons = []
        if not self.kafka_reachable:
            reasons.append("Kafka unreachable")
        if not self._ledger_caught_up.is_set():
            reasons.append("starting: reading the ledger")
        if self.auth_failed is not None:
            reasons.append(f"API authentication failed ({self.auth_failed.status})")
        if self._client.breaker_state is not BreakerState.CLOSED:
            reasons.append("API circuit breaker open")
        return reasons

    async def _refresh_gauges(self) -> None:
        metrics = self.metrics
        metrics.ready.set(0 if self.readiness() else 1)
        metrics.intake_paused.set(1 if self._paused else 0)
        metrics.buffered_values.set(self.buffered_values)
        metrics.api_auth_failed.set(1 if self.auth_failed is not None else 0)
        state = self._poller_state
        if state is not None:
            now = self._clock()
            metrics.tasks_pending.set(len(state.tasks))
            metrics.tasks_stuck.set(state.schedule.stuck)
            metrics.oldest_pending_task_age.set(state.schedule.oldest_age(now))
        for tp in self._consumer.assignment():
            highwater = self._consumer.highwater(tp)
            if highwater is None:
                continue
            try:
                position = await self._consumer.position(tp)
            except KafkaError:
                continue
            metrics.consumer_lag.labels(str(tp.partition)).set(max(0, highwater - position))

    # -- intake ------------------------------------------------------------------------

    async def _intake(self, stop: asyncio.Event) -> None:
        self._stop_requested = stop
        self._intake_task = asyncio.current_task()
        while not stop.is_set():
            self._update_pause()
            timeout_ms = INTAKE_POLL_MS
            deadline = self._batcher.next_deadline()
            if deadline is not None:
                until_due_ms = int((deadline - self._clock()) * 1000)
                # A due batch waits (and fills) while the uploaders are busy: look again soon.
                waiting = until_due_ms <= 0 and not self._ready.empty()
                timeout_ms = LINGER_RECHECK_MS if waiting else max(0, min(timeout_ms, until_due_ms))
            batches = await self._consumer.getmany(timeout_ms=timeout_ms, max_records=2000)
            self._last_poll = self._clock()
            epoch = self._rebalances
            consumed = 0
            for record in (r for records in batches.values() for r in records):
                if stop.is_set() or epoch != self._rebalances:
                    # Stopping, or a rebalance happened while these records waited: records
                    # not processed are not tracked, so they are read again from the commit.
                    break
                consumed += 1
                await self._on_record(record)
            self.metrics.events_consumed.inc(consumed)
            # Linger-due batches go only when an uploader is free to take them at once;
            # until then they keep filling (full ones are queued regardless).
            if self._ready.empty():
                for batch in self._batcher.due(self._clock(), limit=1):
                    await self._send(batch)

    def _update_pause(self) -> None:
        reason = self._pause_reason()
        assignment = self._consumer.assignment()
        if reason and not self._paused:
            log.info("intake_paused", reason=reason)
            self._paused = True
        elif not reason and self._paused:
            log.info("intake_resumed")
            self._paused = False
        if self._paused:
            self._consumer.pause(*assignment)
        else:
            self._consumer.resume(*assignment)

    def _pause_reason(self) -> str | None:
        if not self._ledger_caught_up.is_set():
            return "reading the ledger"
        if self.auth_failed is not None:
            return "API authentication failed"
        if self._api_degraded:
            return "API unavailable"
        if self.buffered_values >= self.config.max_buffered_values:
            return "buffer full"
        if len(self._unfinished) >= self.config.max_unfinished_tasks:
            return "too many unfinished tasks"
        return None

    async def _on_record(self, record: Any) -> None:
        if self._offsets.received(record.topic, record.partition, record.offset):
            # Recorded before a restart or takeover (commit metadata): already done.
            self.metrics.events_skipped.inc()
            return
        raw: bytes = record.value if record.value is not None else b""
        parsed = parse_event(raw, self.config.limits)
        if not isinstance(parsed, ParsedEvent):
            self.metrics.events_invalid.labels(parsed.reason.value).inc()
            log.warning(
                "event_invalid",
                topic=record.topic,
                partition=record.partition,
                offset=record.offset,
                reason=parsed.reason.value,
                field=parsed.field,
                message=parsed.message,
            )
            headers = DeadLetterHeaders(
                stage=parsed.stage,
                reason=parsed.reason,
                message=parsed.message,
                source_topic=record.topic,
                source_partition=record.partition,
                source_offset=record.offset,
            )
            source = Source(record.topic, record.partition, record.offset)
            await self._commits.put(_DeadLetter(source, raw, record.key, headers))
            return
        if parsed.warnings:
            self.metrics.date_warnings.inc(len(parsed.warnings))
            log.warning(
                "event_warning",
                event_id=parsed.event.event_id,
                partition=record.partition,
                offset=record.offset,
                warnings=list(parsed.warnings),
            )
        pending = PendingEvent(
            source=Source(record.topic, record.partition, record.offset, parsed.event.event_id),
            event=parsed.event,
            raw=raw,
            key=record.key,
            received_at=self._clock(),
        )
        await self._dispatch(pending)

    async def _dispatch(self, pending: PendingEvent, *, admitted: bool = False) -> None:
        """Batch an event, or hold it back behind an earlier change to its codes.

        `admitted`: the guard just released it from the held queue (it passed the check).
        """
        event = pending.event
        change = Change(event.constraint_key, event.constraint_values, event.scm_data)
        if not admitted and self._guard.conflicts(change):
            self.metrics.events_held_back.inc()
            log.info(
                "event_held_back",
                event_id=event.event_id,
                partition=pending.source.partition,
                offset=pending.source.offset,
            )
            self._guard.hold(pending, change)
            return
        duplicates_before = self._batcher.deduplicated
        ready, placed = self._batcher.add(pending, self._clock())
        if self._batcher.deduplicated > duplicates_before:
            self.metrics.events_deduplicated.inc(self._batcher.deduplicated - duplicates_before)
        for batch, part in placed:
            if part.values:
                self._guard.claim(
                    batch.batch_id, Change(part.constraint_key, part.values, batch.scm_data)
                )
        for batch in ready:
            await self._send(batch)

    async def _send(self, batch: Batch) -> None:
        """Queue a batch for the submitters; when stopping, hand it to the shutdown flush
        instead of waiting for room (the queue may be full behind a slow API).

        While intake waits for room, it keeps polling Kafka with its partitions paused
        (which returns nothing): a consumer that does not poll for max.poll.interval.ms
        leaves its group, and an API outage of a minute would move the partitions.
        """
        self._in_flight[batch.batch_id] = batch
        put = asyncio.ensure_future(self._ready.put(batch))
        stopping = asyncio.ensure_future(self._stop_requested.wait())
        epoch = self._rebalances
        try:
            intake = asyncio.current_task() is self._intake_task
            while True:
                # Counted from intake's last poll, not from this call: many short waits in a
                # row add up too.
                wait_s = max(0.0, self._last_poll + QUEUE_KEEPALIVE_S - self._clock())
                done, _ = await asyncio.wait(
                    {put, stopping},
                    timeout=wait_s if intake else None,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if done:
                    break
                self._hold_intake("uploads queued behind a busy API")
                await self._consumer.getmany(timeout_ms=0)
                self._last_poll = self._clock()
                if epoch != self._rebalances:
                    break
        finally:
            stopping.cancel()
            if not put.done():
                put.cancel()
        if put.done() and not put.cancelled():
            return
        if epoch != self._rebalances:
            # Partitions were revoked while this batch waited: like every unsent batch, it
            # is forgotten and its events are read again by the partitions' next owner.
            self._in_flight.pop(batch.batch_id, None)
            self._guard.release(batch.batch_id)
            return
        self._stop_queue.append(batch)

    def _hold_intake(self, reason: str) -> None:
        """Pause the input partitions until the next intake round decides again."""
        if not self._paused:
            log.info("intake_paused", reason=reason)
            self._paused = True
        self._consumer.pause(*self._consumer.assignment())

    async def _release_held(self) -> None:
        while (pending := self._guard.next_admissible()) is not None:
            await self._dispatch(pending, admitted=True)

    # -- submitters ------------------------------------------------------------------------

    async def _submitter(self) -> None:
        while (batch := await self._next_batch()) is not None:
            await self._submit(batch)

    async def _next_batch(self) -> Batch | None:
        """The next batch to upload; None when shutting down and nothing more may start."""
        if self._no_new_uploads:
            return None
        if not self._ready.empty() or not self._queue_closed.is_set():
            ready = asyncio.ensure_future(self._ready.get())
            closed = asyncio.ensure_future(self._queue_closed.wait())
            try:
                await asyncio.wait({ready, closed}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                closed.cancel()
                if not ready.done():
                    ready.cancel()
            if ready.done() and not ready.cancelled():
                return ready.result()
        if self._no_new_uploads or not self._stop_queue:
            return None
        return self._stop_queue.popleft()

    async def _submit(self, batch: Batch) -> None:
        request = UploadRequest(
            constraints=batch.constraints(),
            scm_data=batch.scm_data,
            campaign=batch.campaign,
            reference=batch.reference or None,
        )
        bound = log.bind(batch_id=batch.batch_id, values=batch.size, events=len(batch.events()))
        attempt = 0
        while True:
            submitted_at = utcnow()
            outcome = await self._client.upload(request)
            if isinstance(outcome, Accepted):
                self._api_degraded = False
                reason = (batch.flush_reason or FlushReason.SHUTDOWN).value
                self.metrics.batches_submitted.labels(reason).inc()
                self.metrics.batch_values.observe(batch.size)
                bound.info("batch_submitted", task_id=outcome.task_id, flush_reason=reason)
                record = self._ledger_record(batch, outcome.task_id, submitted_at)
                append = _LedgerAppend(record, batch)
                await self._commits.put(append)
                # Take the next batch only once this task is in the ledger: a crash then
                # leaves at most one created-but-unrecorded task per submitter.
                await append.recorded
                return
            if isinstance(outcome, Rejected):
                bound.warning("batch_rejected", status=outcome.status, errors=outcome.errors)
                self._guard.release(batch.batch_id)
                await self._commits.put(_ApiRejection(batch, outcome))
                await self._release_held()
                return
            if isinstance(outcome, AuthFailed):
                if self.auth_failed is None:
                    log.error(
                        "api_auth_failed_intake_stopped",
                        status=outcome.status,
                        hint="the API token (SCM_RELAY_API_TOKEN) is missing, wrong or lacks "
                        "permissions; fix it and restart: no event is lost or dead-lettered",
                    )
                self.auth_failed = outcome
                self.metrics.api_auth_failed.set(1)
                self.metrics.ready.set(0)
                await _park()
            self._api_degraded = True
            wait = self._submit_retry_wait(outcome, attempt)
            bound.warning(
                "batch_retry",
                outcome=type(outcome).__name__,
                wait_s=round(wait, 2),
                attempt=attempt,
            )
            await asyncio.sleep(wait)
            attempt += 1

    @staticmethod
    def _submit_retry_wait(outcome: Throttled | Unavailable | Ambiguous, attempt: int) -> float:
        if isinstance(outcome, Throttled | Unavailable) and outcome.retry_after_s:
            return outcome.retry_after_s
        return float(min(RETRY_CEILING_S, RETRY_FLOOR_S * 2 ** min(attempt, 16)))

    def _ledger_record(
        self, batch: Batch, task_id: str, submitted_at: datetime
    ) -> TaskLedgerRecord:
        # Validated as one document: pydantic checks the nested event sources in its core,
        # which is several times cheaper than building one model object per event.
        return TaskLedgerRecord.model_validate(
            {
                "task_id": task_id,
                "batch_id": batch.batch_id,
                "submitted_at": submitted_at,
                "campaign": batch.campaign,
                "reference": batch.reference,
                "scm_data": batch.scm_data,
                "constraints": batch.constraints(),
                "expected_codes": batch.expected_codes(self.config.limits.one_code_per_value_keys),
                "events": [
                    {
                        "topic": pending.source.topic,
                        "partition": pending.source.partition,
                        "offset": pending.source.offset,
                        "event_id": pending.source.event_id,
                    }
                    for pending in batch.events()
                ],
            }
        )

    # -- committer ---------------------------------------------------------------------------

    async def _committer(self) -> None:
        while True:
            items = [await self._commits.get()]
            while len(items) < COMMIT_BATCH_MAX and not self._commits.empty():
                items.append(self._commits.get_nowait())
            stop = any(isinstance(item, _Stop) for item in items)
            work = [item for item in items if not isinstance(item, _Stop)]
            if work:
                await self._commit(work)
            if stop:
                return

    async def _commit(self, items: Sequence[_CommitItem]) -> None:
        """One Kafka transaction for `items` and the input offsets they release."""
        finished: list[Callable[[], None]] = []
        self._committing = True
        await self._producer.begin_transaction()
        try:
            for item in items:
                await self._write(item, finished)
            advanced = self._offsets.checkpoints()
            if advanced:
                offsets = {TopicPartition(t, p): point for (t, p), point in advanced.items()}
                await self._producer.send_offsets_to_transaction(offsets, self.config.group_id)
            await self._producer.commit_transaction()
        except BaseException:
            # Kafka refused the transaction: what it carried is unrecorded. Stop the process;
            # a restart re-reads from the last committed offsets (docs/guarantees.md).
            log.exception("transaction_failed", items=len(items))
            raise
        finally:
            self._committing = False
        self.metrics.last_commit.set(time.time())
        for done in finished:
            done()
        for item in items:
            if isinstance(item, _LedgerAppend) and not item.recorded.done():
                item.recorded.set_result(None)
        if advanced:
            log.debug(
                "offsets_committed", offsets={f"{t}:{p}": o for (t, p), o in advanced.items()}
            )

    async def _write(self, item: _CommitItem, finished: list[Callable[[], None]]) -> None:
        if isinstance(item, _LedgerAppend):
            record = item.record
            await self._producer.send(
                self.config.tasks_topic,
                key=record.task_id.encode(),
                value=record.model_dump_json().encode(),
            )
            self._written_ledger[record.task_id] = record
            self._account(item.batch)
        elif isinstance(item, _DeadLetter):
            await self._producer.send(
                self.config.dlq_topic, key=item.key, value=item.raw, headers=item.headers.to_kafka()
            )
            self._offsets.accounted(item.source.topic, item.source.partition, item.source.offset)
            self.metrics.dead_letters.labels(
                item.headers.stage.value, item.headers.reason.value
            ).inc()
        elif isinstance(item, _ApiRejection):
            for pending in item.batch.events():
                if pending.rejected:
                    continue
                pending.rejected = True
                headers = DeadLetterHeaders(
                    stage=Stage.API,
                    reason=Reason.API_REJECTED,
                    message=f"the API refused the request carrying this event "
                    f"(HTTP {item.outcome.status})",
                    source_topic=pending.source.topic,
                    source_partition=pending.source.partition,
                    source_offset=pending.source.offset,
                    api_status=item.outcome.status,
                    api_body=item.outcome.body,
                )
                await self._producer.send(
                    self.config.dlq_topic,
                    key=pending.key,
                    value=pending.raw,
                    headers=headers.to_kafka(),
                )
            self._account(item.batch)
        elif isinstance(item, _TaskFinished):
            outcome = item.outcome
            key = outcome.task_id.encode()
            await self._producer.send(
                self.config.results_topic, key=key, value=outcome.model_dump_json().encode()
            )
            await self._producer.send(self.config.tasks_topic, key=key, value=None)
            finished.append(item.done)
        elif isinstance(item, _Progress):
            await self._producer.send(
                self.config.results_topic,
                key=item.progress.task_id.encode(),
                value=item.progress.model_dump_json().encode(),
            )

    def _account(self, batch: Batch) -> None:
        """A batch is recorded (or dead-lettered): its events' parts are accounted for."""
        self._in_flight.pop(batch.batch_id, None)
        for part in batch.parts:
            pending = part.event
            pending.parts_done += 1
            if pending.parts_done == pending.parts:
                source = pending.source
                self._offsets.accounted(source.topic, source.partition, source.offset)

    # -- rebalances ----------------------------------------------------------------------------

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        """Forget unsent work, wait (bounded) for uploads under way, let the committer
        record what they accounted for.

        aiokafka rebalances eagerly: every partition is revoked, and those assigned again
        are re-read from their committed offsets. Events that were not sent are simply read
        again; events in an upload still under way are skipped when read again here (their
        upload accounts for them), and re-sent only by another owner if it finishes late.
        The callback can run while intake is busy with records it already fetched: intake
        stops at the next record, and what it added meanwhile is dropped at the end.
        """
        if not revoked:
            return
        self._rebalances += 1
        dropped = self._drop_unsent()
        deadline = self._clock() + self.config.rebalance_timeout_s
        await _wait_for_state(lambda: not self._in_flight, deadline, self._clock)
        # Accounted is not committed: wait until the committer has committed it all, or the
        # offsets of partitions that move away would be lost with their trackers.
        await _wait_for_state(
            lambda: self._commits.empty() and not self._committing, deadline, self._clock
        )
        dropped += self._drop_unsent()
        for batch in self._in_flight.values():
            for part in batch.parts:
                source = part.event.source
                self._offsets.partition(source.topic, source.partition).in_flight(source.offset)
        if self._in_flight:
            # If another consumer gets these partitions it sends these events again: the
            # duplicate window of docs/guarantees.md.
            log.warning("rebalance_deadline_uploads_in_flight", batches=len(self._in_flight))
        log.info(
            "partitions_revoked",
            partitions=sorted(f"{tp.topic}:{tp.partition}" for tp in revoked),
            dropped_events=dropped,
        )

    def _drop_unsent(self) -> int:
        """Forget open, held and queued batches (their events are read again); returns the
        number of events dropped."""
        dropped: set[int] = set()
        for batch in self._batcher.discard():
            self._guard.release(batch.batch_id)
            self._in_flight.pop(batch.batch_id, None)
            dropped |= {id(p.event) for p in batch.parts}
        dropped |= {id(p) for p in self._guard.drop_held()}
        while not self._ready.empty():
            queued = self._ready.get_nowait()
            if queued is not None:
                self._guard.release(queued.batch_id)
                self._in_flight.pop(queued.batch_id, None)
                dropped |= {id(p.event) for p in queued.parts}
        return len(dropped)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        """New partitions start from their committed offsets (aiokafka's default); the
        offsets done above them, from the commit metadata, are skipped."""
        self._offsets.keep_only({(tp.topic, tp.partition) for tp in assigned})
        self.metrics.consumer_lag.clear()
        if assigned:
            committed = await self._admin.list_consumer_group_offsets(
                self.config.group_id, partitions=sorted(assigned)
            )
            for tp, point in committed.items():
                if point is not None and point.metadata:
                    self._offsets.partition(tp.topic, tp.partition).restore(point.metadata)
        log.info(
            "partitions_assigned",
            partitions=sorted(f"{tp.topic}:{tp.partition}" for tp in assigned),
        )

    # -- ledger view ------------------------------------------------------------------------------

    async def _ledger_view(self) -> None:
        reader = self._ledger_reader
        # Subscribed without a group: aiokafka assigns every partition, read from the start.
        while not reader.assignment():
            await reader.getmany(timeout_ms=100)
        partitions = sorted(reader.assignment())
        await reader.seek_to_beginning(*partitions)
        while True:
            batches = await reader.getmany(timeout_ms=200, max_records=5000)
            released = False
            for records in batches.values():
                for record in records:
                    released |= self._apply_ledger(record)
            if released:
                await self._release_held()
            if not self._ledger_caught_up.is_set():
                # To the high watermark, past any transaction a killed relay left open.
                behind = [
                    tp
                    for tp in partitions
                    if reader.highwater(tp) is None
                    or await reader.position(tp) < (reader.highwater(tp) or 0)
                ]
                if not behind:
                    log.info("ledger_read", unfinished_tasks=len(self._unfinished))
                    self._ledger_caught_up.set()

    def _apply_ledger(self, record: Any) -> bool:
        """Track one ledger record; True when a task ended (claims were released)."""
        task_id = record.key.decode() if record.key else ""
        if record.value is None:
            batch_id = self._unfinished.pop(task_id, None)
            if batch_id is not None:
                self._guard.release(batch_id)
                return True
            return False
        own = self._written_ledger.pop(task_id, None)
        if own is not None:
            # Written by this process: the object it was serialised from, not parsed again.
            self._track_ledger_entry(own)
            return False
        try:
            entry = TaskLedgerRecord.model_validate_json(record.value)
        except ValidationError as exc:
            problem = str(exc)[:300]
        else:
            self._track_ledger_entry(entry)
            return False
        log.error("ledger_record_unreadable", task_id=task_id, error=problem)
        return False

    def _track_ledger_entry(self, entry: TaskLedgerRecord) -> None:
        self._unfinished[entry.task_id] = entry.batch_id
        if not self._guard.owns(entry.batch_id):
            for key, values in entry.constraints.items():
                self._guard.claim(entry.batch_id, Change(key, tuple(values), entry.scm_data))

    # -- poller ------------------------------------------------------------------------------------

    async def _poller(self) -> None:
        tracker = _PollerState(self)
        self._poller_state = tracker
        consumer = self._poller_consumer
        listener = _PollerRebalance(tracker, consumer, self.config.rebalance_timeout_s)
        consumer.subscribe([self.config.tasks_topic], listener=listener)
        while not self._stopping:
            batches = await consumer.getmany(timeout_ms=200, max_records=5000)
            for tp, records in batches.items():
                for record in records:
                    tracker.apply(tp, record)
            if not await tracker.caught_up(consumer):
                continue
            due = tracker.schedule.due(self._clock())
            if due:
                await self._poll(tracker, due)

    async def _poll(self, tracker: _PollerState, due: list[str]) -> None:
        page = await self._client.tasks(due)
        now = self._clock()
        if not isinstance(page, TaskPage):
            log.warning("task_poll_failed", outcome=type(page).__name__, tasks=len(due))
            for task_id in due:
                tracker.schedule.polled(task_id, now)
            return
        seen = {task.id: task for task in page.tasks}
        for task_id in due:
            task = seen.get(task_id)
            entry = tracker.tasks.get(task_id)
            if entry is None:
                continue
            if task is None or not task.state.finished:
                tracker.schedule.polled(task_id, now)
                if tracker.schedule.newly_stuck(task_id, now):
                    await self._report_stuck(entry, task, tracker.schedule.age(task_id, now))
                continue
            tracker.schedule.finishing(task_id)
            outcome = self._outcome(entry, task)
            self.metrics.tasks_finished.labels(outcome.state.value).inc()
            self.metrics.task_duration.labels(outcome.state.value).observe(
                max(0.0, (outcome.published_at - entry.submitted_at).total_seconds())
            )
            if outcome.short and outcome.shortfall:
                self.metrics.tasks_short.inc()
                self.metrics.tasks_short_codes.inc(outcome.shortfall)
            log.info(
                "task_finished",
                task_id=task_id,
                state=outcome.state.value,
                codes_affected=outcome.codes_affected,
                expected_codes=outcome.expected_codes,
                short=outcome.short,
            )
            await self._commits.put(
                _TaskFinished(outcome, functools.partial(tracker.forget, task_id))
            )

    async def _report_stuck(
        self, entry: TaskLedgerRecord, task: ApiTask | None, age: float
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
        await self._commits.put(_Progress(progress))

    @staticmethod
    def _outcome(entry: TaskLedgerRecord, task: ApiTask) -> TaskOutcome:
        state = TaskState.COMPLETE if task.state is TaskApiState.COMPLETE else TaskState.FAILED
        shortfall: int | None = None
        if state is TaskState.COMPLETE and entry.expected_codes is not None:
            shortfall = max(0, entry.expected_codes - (task.codes_affected or 0))
        return TaskOutcome(
            task_id=entry.task_id,
            state=state,
            codes_affected=task.codes_affected,
            expected_codes=entry.expected_codes,
            shortfall=shortfall,
            short=bool(shortfall),
            campaign=entry.campaign,
            reference=entry.reference,
            scm_data=entry.scm_data,
            constraints=entry.constraints,
            events=entry.events,
            submitted_at=entry.submitted_at,
            created_at=task.created_at,
            started_at=task.started_at,
            completed_at=task.completed_at,
            published_at=utcnow(),
        )


async def _park() -> NoReturn:
    """Wait until cancelled (a submitter after an authentication failure)."""
    await asyncio.Event().wait()
    raise AssertionError("unreachable")


async def _wait_for_state(
    condition: Callable[[], bool], deadline: float, clock: Callable[[], float]
) -> None:
    """Wait until `condition` holds or `deadline` passes. The state belongs to other tasks
    that change it without notifying, so a short poll is the simple, bounded choice."""
    while not condition() and clock() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.05)


class _PollerState:
    """Unfinished tasks of the ledger partitions assigned to this poller."""

    def __init__(self, relay: Relay) -> None:
        config = relay.config
        self.schedule = PollSchedule(
            initial_s=config.poll_initial_s,
            factor=config.poll_factor,
            max_s=config.poll_max_s,
            stuck_after_s=config.task_stuck_after_s,
            # Rounds gather the tasks of one poll interval into one bulk request.
            gather_s=config.poll_initial_s,
            round_size=config.status_chunk_size,
        )
        self.clock = relay._clock
        self.tasks: dict[str, TaskLedgerRecord] = {}
        self.partition_of: dict[str, TopicPartition] = {}
        # Partitions being rebuilt: polling waits until each is read to its high watermark.
        self.rebuilding: set[TopicPartition] = set()

    def apply(self, tp: TopicPartition, record: Any) -> None:
        task_id = record.key.decode() if record.key else ""
        if record.value is None:
            self.forget(task_id)
            return
        try:
            entry = TaskLedgerRecord.model_validate_json(record.value)
        except ValidationError:
            return  # the ledger view logs it
        if entry.task_id not in self.tasks:
            self.tasks[entry.task_id] = entry
            self.partition_of[entry.task_id] = tp
            age = max(0.0, (utcnow() - entry.submitted_at).total_seconds())
            self.schedule.add(entry.task_id, self.clock(), age_s=age)

    def forget(self, task_id: str) -> None:
        self.tasks.pop(task_id, None)
        self.partition_of.pop(task_id, None)
        self.schedule.remove(task_id)

    def finishing_in(self, partitions: set[TopicPartition]) -> bool:
        return any(
            tp in partitions and self.schedule.is_finishing(task_id)
            for task_id, tp in self.partition_of.items()
        )

    def drop_partitions(self, partitions: set[TopicPartition]) -> None:
        for task_id, tp in list(self.partition_of.items()):
            if tp in partitions:
                self.forget(task_id)
        self.rebuilding -= partitions

    async def caught_up(self, consumer: AIOKafkaConsumer) -> bool:
        """Every rebuilt partition read up to its high watermark. Not the last stable
        offset: a transaction left open by a killed relay hides what follows it (such as a
        tombstone) until the broker aborts it, and polling before seeing those would
        publish a task's result twice."""
        for tp in list(self.rebuilding):
            highwater = consumer.highwater(tp)
            if highwater is None or await consumer.position(tp) < highwater:
                return False
            self.rebuilding.discard(tp)
        return True


class _PollerRebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, state: _PollerState, consumer: AIOKafkaConsumer, timeout_s: float) -> None:
        self._state = state
        self._consumer = consumer
        self._timeout_s = timeout_s

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        # Results being published must land before the new owner rebuilds, or it would
        # publish them again.
        clock = asyncio.get_running_loop().time
        deadline = clock() + self._timeout_s
        await _wait_for_state(lambda: not self._state.finishing_in(set(revoked)), deadline, clock)
        self._state.drop_partitions(set(revoked))

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        # Rebuild every assigned partition from the beginning: the ledger is the only state.
        self._state.drop_partitions(set(assigned))
        if not assigned:
            return
        await self._consumer.seek_to_beginning(*assigned)
        self._state.rebuilding |= set(assigned)


class _InputRebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, relay: Relay) -> None:
        self._relay = relay

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self._relay.on_partitions_revoked(set(revoked))

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        await self._relay.on_partitions_assigned(set(assigned))
