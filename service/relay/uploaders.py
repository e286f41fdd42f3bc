"""The uploaders: take ready batches, upload each to the API, hand the outcome on.

They own the upload queue and the retries of uploads (the API client attempts an
upload once: only here is it known whether a resend is safe). An accepted batch
becomes a ledger record for the committer; a rejected one becomes dead letters
and a message to intake that its claims end; an authentication failure parks
the upload (nothing is lost, intake stops) until the relay stops.

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
from service.scantrust.client import UploadRequest
from service.scantrust.outcomes import Accepted, AuthFailed, Rejected, retry_wait

log = structlog.get_logger(__name__)


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
        api: UploadApi,
        committer: Recorder,
        intake: IntakeInbox,
        health: ApiHealth,
        metrics: RelayMetrics,
        rng: random.Random | None = None,
    ) -> None:
        self._config = config
        self._api = api
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
            reference=batch.reference or None,
        )
        bound = log.bind(batch_id=batch.batch_id, values=batch.size, events=len(batch.events()))
        attempt = 0
        while not self._deadline_passed:
            if self._stopping.is_set() and self._health.auth_failed is not None:
                return
            submitted_at = utcnow()
            async with self._sending_request():
                outcome = await self._api.upload(request)
                if isinstance(outcome, Accepted):
                    append = self._accepted(batch, outcome, submitted_at, bound)
                    await self._committer.submit(append)
                elif isinstance(outcome, Rejected):
                    bound.warning("batch_rejected", status=outcome.status, errors=outcome.errors)
                    await self._committer.submit(ApiRejection(batch, outcome))
            if isinstance(outcome, Accepted):
                if not self._deadline_passed:
                    # The next batch only once this task is in the ledger: a crash then
                    # leaves at most one created-but-unrecorded task per uploader.
                    await append.recorded
                return
            if isinstance(outcome, Rejected):
                await self._intake.tell(BatchRejected(batch.batch_id))
                return
            if isinstance(outcome, AuthFailed):
                self._health.auth_refused(outcome)
                self._metrics.api_auth_failed.set(1)
                self._metrics.ready.set(0)
                await self._stopping.wait()
                return
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
        outcome: Accepted,
        submitted_at: datetime,
        bound: structlog.typing.FilteringBoundLogger,
    ) -> LedgerAppend:
        self._health.upload_accepted()
        reason = (batch.flush_reason or FlushReason.SHUTDOWN).value
        self._metrics.batches_submitted.labels(reason).inc()
        self._metrics.batch_values.observe(batch.size)
        bound.info("batch_submitted", task_id=outcome.task_id, flush_reason=reason)
        return LedgerAppend(self._ledger_record(batch, outcome.task_id, submitted_at), batch)

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
