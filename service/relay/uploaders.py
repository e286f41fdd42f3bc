"""The uploaders: take ready batches, upload each to the API, hand the outcome on.

They own the upload queue and the retries of uploads (the API client attempts an
upload once: only here is it known whether a resend is safe). An accepted batch
becomes a ledger record for the committer; a rejected one becomes dead letters
and a message to intake that its claims end; an authentication failure parks
the upload (nothing is lost, intake stops) until the relay stops. An ambiguous
answer is never resent blindly: once the request can no longer create a task,
the task is looked up by reference and adopted, and only when none exists is the
batch sent again (reconcile.py).

Every request is sent under a write-ahead intent the committer committed first,
and only before the intent's `send_by` (a later attempt commits a fresh one). An
intent another process left open (a `Resolution` from intake) is looked up
first: its task adopted, or its request sent again (docs/design.md section 11).

Shutdown (`drain`) is bounded twice: queued and final batches are uploaded until
the shutdown deadline; then no new attempt starts, uploads whose request is
under way get the grace to finish (cancelling one after it was sent would leave
a task nobody recorded), and every other uploader is cancelled at once.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from typing import Any, Final, NamedTuple, Protocol

import structlog
from pydantic import TypeAdapter

from service.core.batching import Batch, Done, FlushReason, PendingEvent
from service.core.records import EventSource, IntentRecord, TaskLedgerRecord
from service.core.resilience import Backoff
from service.core.slots import Slot
from service.metrics import RelayMetrics
from service.relay.config import RelayConfig, utcnow, wall_time
from service.relay.health import ApiHealth
from service.relay.ledger import KnownTasks
from service.relay.messages import (
    ApiRejection,
    BatchAbandoned,
    BatchRejected,
    BatchRevokedError,
    IntentWrite,
    LedgerAppend,
    Resolution,
)
from service.relay.ports import UploadApi
from service.relay.reconcile import Reconciler, TaskLookup, api_reference
from service.scantrust.client import UploadRequest, send_window_closed
from service.scantrust.outcomes import (
    Accepted,
    Ambiguous,
    AuthFailed,
    Expired,
    Failure,
    Misconfigured,
    PagesExceeded,
    Rejected,
    retry_wait,
)

log = structlog.get_logger(__name__)


class UploadAndLookupApi(UploadApi, TaskLookup, Protocol):
    """The API as the uploaders use it: uploads, and the reads of reconciliation."""


class Recorder(Protocol):
    """The committer, as the uploaders see it."""

    async def submit(self, item: LedgerAppend | ApiRejection) -> None:
        """Queue an outcome for the next transaction."""

    async def write_intent(self, intent: IntentWrite) -> None:
        """Commit an intent; returns once it is committed."""


class IntakeInbox(Protocol):
    """Intake, as the uploaders see it."""

    async def tell(self, message: BatchRejected | BatchAbandoned) -> None:
        """Tell intake a batch's claims end, or that it was given up."""


class Uploaders:
    """`max_in_flight_requests` workers over one bounded queue of ready batches."""

    def __init__(
        self,
        config: RelayConfig,
        *,
        api: UploadAndLookupApi,
        committer: Recorder,
        intake: IntakeInbox,
        health: ApiHealth,
        metrics: RelayMetrics,
        owns: Callable[[Batch], bool] = lambda _batch: True,
        rng: random.Random | None = None,
        known: KnownTasks | None = None,
    ) -> None:
        self._config = config
        self._owns = owns
        self._api = api
        # Shared with the ledger view, which notes every task the ledger holds.
        self._known = known if known is not None else KnownTasks()
        self._reconciler = Reconciler(api, self._known)
        self._committer = committer
        self._intake = intake
        self._health = health
        self._metrics = metrics
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not cryptography
        self._backoff = Backoff(config.api.retry_initial_s, config.api.retry_max_backoff_s)
        # None tells one worker to end.
        self._queue: asyncio.Queue[Batch | Resolution | None] = asyncio.Queue(
            maxsize=config.batching.max_in_flight_requests * 2
        )
        self._workers: list[asyncio.Task[None]] = []
        self._sending: set[asyncio.Task[Any]] = set()  # workers with a request under way
        self._stopping = asyncio.Event()  # shutdown began: parked uploads end
        self._deadline_passed = False  # no new attempt starts
        self._finished = asyncio.Event()  # every worker has ended

    async def put(self, batch: Batch | Resolution) -> None:
        """Queue a batch, or an intent to resolve (waits for room)."""
        await self._queue.put(batch)

    @property
    def idle(self) -> bool:
        """Nothing queued: a free uploader would take a batch at once."""
        return self._queue.empty()

    def take_queued(self) -> list[Batch]:
        """Take back the batches no uploader has started (a rebalance)."""
        taken = []
        while not self._queue.empty():
            job = self._queue.get_nowait()
            if isinstance(job, Resolution):
                taken.append(job.batch)
            elif job is not None:
                taken.append(job)
        return taken

    async def run(self) -> None:
        """Run the workers until each is told to end (or cancelled by `drain`)."""
        try:
            async with asyncio.TaskGroup() as group:
                self._workers = [
                    group.create_task(self._work(), name=f"uploader-{n}")
                    for n in range(self._config.batching.max_in_flight_requests)
                ]
        finally:
            self._finished.set()

    async def drain(self, final: list[Batch], timeout_s: float, grace_s: float) -> None:
        """Upload what is queued and `final` within `timeout_s`, then stop (see above)."""
        self._stopping.set()
        pending = list(final)
        try:
            async with asyncio.timeout(timeout_s):
                while pending:
                    await self._queue.put(pending[0])
                    pending.pop(0)
                for _ in range(self._config.batching.max_in_flight_requests):
                    await self._queue.put(None)
                await self._finished.wait()
        except TimeoutError:
            pass
        self._deadline_passed = True
        for worker in self._workers:
            if worker not in self._sending:
                worker.cancel()
        late: set[asyncio.Task[None]] = set()
        if self._sending:
            _, late = await asyncio.wait(set(self._sending), timeout=grace_s)
            for worker in late:
                worker.cancel()
        unsent = len(pending) + len(self.take_queued())
        if late or unsent:
            log.warning(
                "relay_shutdown_deadline", unsent_batches=unsent, cancelled_uploads=len(late)
            )

    async def _work(self) -> None:
        while (job := await self._queue.get()) is not None:
            if isinstance(job, Resolution):
                await self._upload(job.batch, job.intent, job.sources)
            else:
                await self._upload(job)
            if self._deadline_passed:
                return

    @asynccontextmanager
    async def _sending_request(self) -> AsyncIterator[None]:
        """Marks the worker as having a request under way (not cancelled at the deadline)."""
        task = asyncio.current_task()
        if task is not None:
            self._sending.add(task)
        try:
            yield
        finally:
            self._sending.discard(task)

    async def _upload(
        self,
        batch: Batch,
        resolving: IntentRecord | None = None,
        sources: list[Done] | None = None,
    ) -> None:
        """Upload `batch` until accepted or rejected; returns early (the batch unsent, its
        events read again at the next start) when stopping makes it pointless, or gives it
        up when its partitions are no longer this intake's (`_abandon`).

        Every request is sent under a committed intent, and only before its `send_by`.
        `resolving`: the intent of a batch another process (or this one before a
        restart) wrote and left open: the task it may have created is looked up first."""
        job = _Job(batch, self._config, resolving, sources)
        bound = log.bind(batch_id=batch.batch_id, values=batch.size, events=len(job.events))
        attempt = 0
        if resolving is not None:
            found = await self._look_up(job, bound)
            if found is None:
                # The shutdown deadline, or the partitions moved: the intent stays open.
                await self._abandon(job, resolving, bound)
                return
            self._metrics.intents_resolved.labels("adopted" if found else "resent").inc()
            bound.warning(
                "intent_resolved",
                task_ids=found,
                written_at=resolving.written_at.isoformat(),
                action="adopted" if found else "resent",
            )
            if found:
                await self._record(job, found, utcnow(), bound, resolving)
                return
            attempt = resolving.attempt + 1
        window: SendWindow | None = None
        intent: IntentRecord | None = None
        slot: Slot | None = None
        while not self._deadline_passed:
            if self._stopping.is_set() and self._health.refusal is not None:
                return
            if window is None or not self._may_send(window, bound):
                # The upload's slot comes while its intent is committed, not after.
                slot = self._api.reserve_upload_slot()
                renewal, window = job.intent(attempt)
                try:
                    await self._committer.write_intent(IntentWrite(renewal))
                except BatchRevokedError:
                    bound.info("batch_revoked_before_sending")
                    # The intent written before (a renewal refused) is still open.
                    await self._abandon(job, intent or resolving, bound)
                    return
                intent = renewal
                if not self._may_send(window, bound):
                    window = None  # the clock jumped while the intent was committed
                    continue
            if not self._owns(batch):
                # Ownership, not membership: a replica still in the group may have lost
                # these partitions; their new owner resolves the intent.
                await self._abandon(job, intent, bound)
                return
            submitted_at = utcnow()
            job.sends += 1
            async with self._sending_request():
                outcome = await self._api.upload(
                    job.request, send_by=window.send_by, deadline=window.deadline, slot=slot
                )
                slot = None  # used, or passed: another attempt takes the next one
                if isinstance(outcome, Expired):
                    # Nothing was sent: a fresh intent first (fenced, like every write).
                    if outcome.clock_jump_s is not None:
                        self._clock_jumped(outcome.clock_jump_s, bound)
                    else:
                        bound.info("intent_expired_before_sending", attempt=attempt)
                    window = None
                    continue
                if isinstance(outcome, Ambiguous):
                    found = await self._reconcile(job, outcome, bound)
                    if found is None:
                        # The shutdown deadline came first (docs/guarantees.md), or the
                        # partitions moved: the intent stays open for their owner.
                        await self._abandon(job, intent, bound)
                        return
                    if not found:
                        # None listed: once more after the list's lag, the one a task just
                        # created may need to show (docs/design.md section 10).
                        await asyncio.sleep(self._config.api.list_lag_s)
                        found = await self._look_up(job, bound)
                        if found is None:
                            await self._abandon(job, intent, bound)
                            return
                    if found:
                        await self._record(job, found, submitted_at, bound, intent)
                        return
                    # Looked up after its timeout: no task exists, so the batch goes again.
                    attempt += 1
                    continue
                if isinstance(outcome, Accepted):
                    await self._record(job, [outcome.task_id], submitted_at, bound, intent)
                    return
                if isinstance(outcome, Rejected):
                    bound.warning("batch_rejected", status=outcome.status, errors=outcome.errors)
                    if not self._owns(batch):
                        # Its new owner resolves the intent (and is refused in turn).
                        await self._abandon(job, intent, bound)
                        return
                    await self._committer.submit(ApiRejection(batch, outcome, job.sources))
            if isinstance(outcome, Rejected):
                await self._intake.tell(BatchRejected(batch.batch_id))
                return
            if isinstance(outcome, AuthFailed | Misconfigured):
                # Intake stops; this batch waits and is the probe: sent again with backoff
                # until the API accepts it (fixed token or URL) or the relay stops.
                self._health.refused("upload", outcome)
                if await self._stopped_within(self._backoff.delay(attempt, self._rng)):
                    return
                attempt += 1
                continue
            self._health.upload_failed()
            wait = retry_wait(outcome, attempt, self._backoff, self._rng)
            self._metrics.retry_scheduled("upload", type(outcome).__name__, wait)
            bound.warning(
                "batch_retry",
                outcome=type(outcome).__name__,
                reason=getattr(outcome, "reason", None),
                wait_s=round(wait, 2),
                attempt=attempt,
            )
            await asyncio.sleep(wait)
            attempt += 1

    def _may_send(self, window: SendWindow, bound: structlog.typing.FilteringBoundLogger) -> bool:
        """Whether the intent's send window is open now by both clocks, which agree."""
        loop = asyncio.get_running_loop()
        closed = send_window_closed(window.send_by, window.deadline, wall_time(), loop.time())
        if closed is not None and closed.clock_jump_s is not None:
            self._clock_jumped(closed.clock_jump_s, bound)
        return closed is None

    def _clock_jumped(self, behind_s: float, bound: structlog.typing.FilteringBoundLogger) -> None:
        self._metrics.clock_jumps.inc()
        bound.warning(
            "clock_jump",
            wall_clock_behind_s=round(behind_s, 3),
            hint="the wall clock moved against the monotonic clock since the intent was "
            "written (a clock step, a VM suspended or migrated): nothing is sent under that "
            "intent; a fresh one is written first",
        )

    async def _record(
        self,
        job: _Job,
        task_ids: list[str],
        submitted_at: datetime,
        bound: structlog.typing.FilteringBoundLogger,
        intent: IntentRecord | None,
    ) -> None:
        """Record the batch's task(s), closing its intent; the next batch only once they
        are in the ledger, so a crash leaves at most one unrecorded task per uploader.
        A record the committer refuses (the partitions moved before it was committed)
        gives the batch up: `intent` stays open for the new owner, who finds the task."""
        batch = job.batch
        self._health.upload_accepted()
        reason = (batch.flush_reason or FlushReason.SHUTDOWN).value
        self._metrics.batches_submitted.labels(reason).inc()
        self._metrics.batch_values.observe(batch.size)
        bound.info("batch_submitted", task_id=task_ids[0], flush_reason=reason)
        if len(task_ids) > 1:
            # Earlier attempts created tasks too: each is recorded, followed and reported.
            bound.warning("batch_created_several_tasks", task_ids=task_ids)
        records = [job.ledger_record(task_id, submitted_at) for task_id in task_ids]
        for record in records:
            # Known from now, not only once the ledger view reads it back: a later batch's
            # lookup with the same reference must not adopt it.
            self._known.note(record.task_id, record.batch_id)
        append = LedgerAppend(records[0], batch, more=records[1:], sources=job.sources)
        await self._committer.submit(append)
        if not self._deadline_passed:
            try:
                await append.recorded
            except BatchRevokedError:
                await self._abandon(job, intent, bound)

    async def _abandon(
        self,
        job: _Job,
        intent: IntentRecord | None,
        bound: structlog.typing.FilteringBoundLogger,
    ) -> None:
        """Give the batch up (its partitions moved, or the shutdown deadline passed):
        intake forgets it, and watches its intent, when one was written, as another
        process's."""
        self._health.upload_given_up()
        if not self._owns(job.batch):
            self._metrics.batches_abandoned.inc()
            bound.warning(
                "batch_abandoned",
                intent_open=intent is not None,
                hint="its partitions are no longer this replica's: their owner resolves "
                "the intent after its resolve_after",
            )
        await self._intake.tell(BatchAbandoned(job.batch.batch_id, intent))

    async def _reconcile(
        self, job: _Job, ambiguous: Ambiguous, bound: structlog.typing.FilteringBoundLogger
    ) -> list[str] | None:
        """The tasks the batch's uploads created, looked up once the request can no
        longer create one; None when the shutdown deadline passes first."""
        self._health.upload_failed()
        bound.warning(
            "batch_ambiguous",
            reason=ambiguous.reason,
            lookup_in_s=self._config.reconcile_after_s,
            hint="looked up by reference before anything is sent again",
        )
        await asyncio.sleep(self._config.reconcile_after_s)
        return await self._look_up(job, bound)

    async def _look_up(
        self, job: _Job, bound: structlog.typing.FilteringBoundLogger
    ) -> list[str] | None:
        """Ask the API for the batch's tasks until it answers; None at the deadline, or
        once the batch's partitions are no longer this intake's (a revoked writer stops
        looking: the new owner resolves the intent)."""
        attempt = 0
        while not self._deadline_passed and self._owns(job.batch):
            found = await self._reconciler.find(
                job.batch, job.request, job.first_sent, sends=job.sends
            )
            if isinstance(found, list) and not self._owns(job.batch):
                return None  # answered after the partitions moved: their owner resolves
            if isinstance(found, list):
                self._metrics.reconciliations.labels("task" if found else "none").inc()
                bound.info("batch_reconciled", task_ids=found, reference=job.request.reference)
                return found
            wait = self._lookup_wait(found, attempt)
            if isinstance(found, PagesExceeded):
                self._metrics.reconcile_lookups_unfinished.inc()
                bound.error(
                    "reconcile_lookup_unfinished",
                    reference=job.request.reference,
                    pages=found.pages,
                    wait_s=wait,
                    hint="the API lists more tasks under this reference than the relay "
                    "reads; the batch is not sent again before a lookup finishes "
                    "(docs/runbooks.md)",
                )
            else:
                bound.warning("reconcile_lookup_failed", outcome=type(found).__name__, wait_s=wait)
            await asyncio.sleep(wait)
            attempt += 1
        return None

    async def _stopped_within(self, wait_s: float) -> bool:
        """Wait `wait_s`, or less if the shutdown starts; True if it did."""
        try:
            async with asyncio.timeout(wait_s):
                await self._stopping.wait()
        except TimeoutError:
            return False
        return True

    def _lookup_wait(self, failure: Failure, attempt: int) -> float:
        if isinstance(failure, Rejected | AuthFailed | Misconfigured | PagesExceeded):
            return self._config.api.retry_max_backoff_s
        return round(retry_wait(failure, attempt, self._backoff, self._rng), 2)


_EVENT_SOURCES: Final = TypeAdapter(list[EventSource])


class SendWindow(NamedTuple):
    """When an intent allows its upload to be sent, on both clocks, from one moment."""

    send_by: float  # Unix time: the intent's `send_by`
    deadline: float  # the event loop's monotonic clock


class _Job:
    """One batch's upload: its request, intent and ledger record, built once."""

    def __init__(
        self,
        batch: Batch,
        config: RelayConfig,
        resolving: IntentRecord | None = None,
        sources: list[Done] | None = None,
    ) -> None:
        self.batch = batch
        self._config = config
        self.request = UploadRequest(
            constraints=batch.constraints(),
            scm_data=batch.scm_data,
            campaign=batch.campaign,
            reference=api_reference(batch),
        )
        self.sources: list[Done] | None = None
        self.events: list[EventSource]
        # Requests that may have created a task (a resolved intent's attempts all may).
        self.sends = 0 if resolving is None else resolving.attempt + 1
        if resolving is None:
            self.first_sent = utcnow()
            events = batch.events()
            # Validated once here, then passed as they are into the intent and the ledger
            # record (pydantic takes model instances without checking them again).
            self.events = _EVENT_SOURCES.validate_python(_event_sources(batch, events))
            self.expected_codes = batch.expected_codes(
                config.limits.one_code_per_value_keys, events
            )
        else:
            self.first_sent = resolving.written_at
            self.events = list(resolving.events)
            self.expected_codes = resolving.expected_codes
            self.sources = sources

    def intent(self, attempt: int) -> tuple[IntentRecord, SendWindow]:
        """A fresh intent for the next send, and its send window: from now, for the
        configured time, on the wall clock (the intent's `send_by`, which other processes
        read) and on the event loop's monotonic clock (which no clock step moves)."""
        window_s = self._config.intent_send_window_s
        deadline = asyncio.get_running_loop().time() + window_s
        send_by = utcnow() + timedelta(seconds=window_s)
        record = IntentRecord.model_validate(
            {
                "batch_id": self.batch.batch_id,
                "api_reference": self.request.reference,
                "written_at": self.first_sent,
                "send_by": send_by,
                "resolve_after": send_by + timedelta(seconds=self._config.intent_resolve_delay_s),
                "attempt": attempt,
                "campaign": self.batch.campaign,
                "reference": self.batch.reference,
                "scm_data": self.batch.scm_data,
                "constraints": self.request.constraints,
                "expected_codes": self.expected_codes,
                "events": self.events,
            }
        )
        return record, SendWindow(record.send_by.timestamp(), deadline)

    def ledger_record(self, task_id: str, submitted_at: datetime) -> TaskLedgerRecord:
        """The task's ledger record. Validated as one document: pydantic checks the nested
        event sources in its core, several times cheaper than one model per event."""
        batch = self.batch
        return TaskLedgerRecord.model_validate(
            {
                "task_id": task_id,
                "batch_id": batch.batch_id,
                "submitted_at": submitted_at,
                "campaign": batch.campaign,
                "reference": batch.reference,
                "scm_data": batch.scm_data,
                "constraints": self.request.constraints,
                "expected_codes": self.expected_codes,
                "events": self.events,
            }
        )


def _event_sources(batch: Batch, events: list[PendingEvent]) -> list[dict[str, Any]]:
    """Each event the batch carries, by position; with the indexes of the values it
    carries when it carries only some (an event cut across batches, or partly done)."""
    covered: dict[int, set[int] | None] = {}
    for part in batch.parts:
        key = id(part.event)
        if part.covered is None:
            covered[key] = None
        elif key not in covered:
            covered[key] = set(part.covered)
        else:
            known = covered[key]
            if known is not None:
                known.update(part.covered)
    sources = []
    for pending in events:
        source = pending.source._asdict()
        values = covered.get(id(pending))
        if values is not None:
            source["values"] = sorted(values)
            source["total"] = pending.total
        sources.append(source)
    return sources
