"""The uploaders: take ready batches, upload each to the API, hand the outcome on.

They own the upload queue and the retries of uploads (the API client attempts an
upload once: only here is it known whether a resend is safe). An accepted batch
becomes a ledger record for the committer; a rejected one becomes dead letters
and a message to intake that its claims end; an authentication failure parks
the upload (nothing is lost, intake stops) until the relay stops. An ambiguous
answer is never resent blindly: once the request can no longer create a task,
the task is looked up by reference and adopted, and only when none exists is the
batch sent again (reconcile.py).

Shutdown (`drain`) is bounded twice: queued and final batches are uploaded until
the shutdown deadline; then no new attempt starts, uploads whose request is
under way get the grace to finish (cancelling one after it was sent would leave
a task nobody recorded), and every other uploader is cancelled at once.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any, Protocol

import structlog

from service.core.batching import Batch, FlushReason
from service.core.records import TaskLedgerRecord
from service.core.resilience import Backoff
from service.metrics import RelayMetrics
from service.relay.config import RelayConfig, utcnow
from service.relay.health import ApiHealth
from service.relay.messages import ApiRejection, BatchRejected, LedgerAppend
from service.relay.ports import UploadApi
from service.relay.reconcile import Reconciler, TaskLookup, api_reference
from service.scantrust.client import UploadRequest
from service.scantrust.outcomes import (
    Accepted,
    Ambiguous,
    AuthFailed,
    Failure,
    Misconfigured,
    Rejected,
    UploadOutcome,
    retry_wait,
)

log = structlog.get_logger(__name__)


class UploadAndLookupApi(UploadApi, TaskLookup, Protocol):
    """The API as the uploaders use it: uploads, and the reads of reconciliation."""


class Recorder(Protocol):
    """The committer, as the uploaders see it."""

    async def submit(self, item: LedgerAppend | ApiRejection) -> None:
        """Queue an outcome for the next transaction."""


class IntakeInbox(Protocol):
    """Intake, as the uploaders see it."""

    async def tell(self, message: BatchRejected) -> None:
        """Tell intake a batch's claims end."""


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
        rng: random.Random | None = None,
    ) -> None:
        self._config = config
        self._api = api
        self._reconciler = Reconciler(api)
        self._committer = committer
        self._intake = intake
        self._health = health
        self._metrics = metrics
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not cryptography
        self._backoff = Backoff(config.retry_initial_s, config.retry_max_backoff_s)
        # None tells one worker to end.
        self._queue: asyncio.Queue[Batch | None] = asyncio.Queue(
            maxsize=config.max_in_flight_requests * 2
        )
        self._workers: list[asyncio.Task[None]] = []
        self._sending: set[asyncio.Task[Any]] = set()  # workers with a request under way
        self._stopping = asyncio.Event()  # shutdown began: parked uploads end
        self._deadline_passed = False  # no new attempt starts
        self._finished = asyncio.Event()  # every worker has ended

    async def put(self, batch: Batch) -> None:
        """Queue a batch (waits for room)."""
        await self._queue.put(batch)

    @property
    def idle(self) -> bool:
        """Nothing queued: a free uploader would take a batch at once."""
        return self._queue.empty()

    def take_queued(self) -> list[Batch]:
        """Take back the batches no uploader has started (a rebalance)."""
        taken = []
        while not self._queue.empty():
            batch = self._queue.get_nowait()
            if batch is not None:
                taken.append(batch)
        return taken

    async def run(self) -> None:
        """Run the workers until each is told to end (or cancelled by `drain`)."""
        try:
            async with asyncio.TaskGroup() as group:
                self._workers = [
                    group.create_task(self._work(), name=f"uploader-{n}")
                    for n in range(self._config.max_in_flight_requests)
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
                for _ in range(self._config.max_in_flight_requests):
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
        while (batch := await self._queue.get()) is not None:
            await self._upload(batch)
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

    async def _upload(self, batch: Batch) -> None:
        """Upload `batch` until accepted or rejected; returns early (the batch unsent, its
        events read again at the next start) when stopping makes it pointless."""
        request = UploadRequest(
            constraints=batch.constraints(),
            scm_data=batch.scm_data,
            campaign=batch.campaign,
            reference=api_reference(batch),
        )
        bound = log.bind(batch_id=batch.batch_id, values=batch.size, events=len(batch.events()))
        attempt = 0
        first_sent = utcnow()
        while not self._deadline_passed:
            if self._stopping.is_set() and self._health.refusal is not None:
                return
            submitted_at = utcnow()
            async with self._sending_request():
                outcome: UploadOutcome | list[str] = await self._api.upload(request)
                if isinstance(outcome, Ambiguous):
                    found = await self._reconcile(batch, request, first_sent, outcome, bound)
                    if found is None:
                        return  # the shutdown deadline came first: see docs/guarantees.md
                    if found:
                        outcome = found
                if isinstance(outcome, Accepted | list):
                    appends = self._accepted(batch, outcome, submitted_at, bound)
                    for append in appends:
                        await self._committer.submit(append)
                elif isinstance(outcome, Rejected):
                    bound.warning("batch_rejected", status=outcome.status, errors=outcome.errors)
                    await self._committer.submit(ApiRejection(batch, outcome))
            if isinstance(outcome, Ambiguous):
                # Looked up after its timeout: no task exists, so the batch goes again.
                attempt += 1
                continue
            if isinstance(outcome, Accepted | list):
                if not self._deadline_passed:
                    # The next batch only once this task is in the ledger: a crash then
                    # leaves at most one created-but-unrecorded task per uploader.
                    await appends[0].recorded
                return
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

    def _accepted(
        self,
        batch: Batch,
        outcome: Accepted | list[str],
        submitted_at: datetime,
        bound: structlog.typing.FilteringBoundLogger,
    ) -> list[LedgerAppend]:
        """Ledger records of the task (or the tasks reconciliation found) of a batch; the
        first accounts for the batch's events."""
        self._health.upload_accepted()
        reason = (batch.flush_reason or FlushReason.SHUTDOWN).value
        self._metrics.batches_submitted.labels(reason).inc()
        self._metrics.batch_values.observe(batch.size)
        task_ids = [outcome.task_id] if isinstance(outcome, Accepted) else outcome
        bound.info("batch_submitted", task_id=task_ids[0], flush_reason=reason)
        if len(task_ids) > 1:
            # Earlier attempts created tasks too: each is recorded, followed and reported.
            bound.warning("batch_created_several_tasks", task_ids=task_ids)
        return [
            LedgerAppend(self._ledger_record(batch, task_id, submitted_at), batch, accounts=n == 0)
            for n, task_id in enumerate(task_ids)
        ]

    async def _reconcile(
        self,
        batch: Batch,
        request: UploadRequest,
        first_sent: datetime,
        ambiguous: Ambiguous,
        bound: structlog.typing.FilteringBoundLogger,
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
        attempt = 0
        while not self._deadline_passed:
            found = await self._reconciler.find(batch, request, first_sent)
            if isinstance(found, list):
                self._metrics.reconciliations.labels("task" if found else "none").inc()
                bound.info("batch_reconciled", task_ids=found, reference=request.reference)
                return found
            wait = self._lookup_wait(found, attempt)
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
        if isinstance(failure, Rejected | AuthFailed | Misconfigured):
            return self._config.retry_max_backoff_s
        return round(retry_wait(failure, attempt, self._backoff, self._rng), 2)

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
                "expected_codes": batch.expected_codes(self._config.limits.one_code_per_value_keys),
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
