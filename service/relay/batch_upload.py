"""One batch's upload, from its first intent to its record, rejection or abandonment.

Every request is sent under a write-ahead intent the committer committed first,
and only before the intent's `send_by` (a later attempt commits a fresh one). An
intent another process left open (a `Resolution` from intake) is looked up
first: its task adopted, or its request sent again (docs/design.md section 11).
An ambiguous answer is never resent blindly: once the request can no longer
create a task, the task is looked up by reference and adopted, and only when
none exists is the batch sent again (reconcile.py, `TaskLookups`).

`Uploaders` (uploaders.py) runs these for its workers and moves the shutdown on
(`UploadShutdown`); each upload reads it to end early and marks the time its
request is under way.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any, Protocol

import structlog

from service.core.batching import Batch, Done, FlushReason
from service.core.records import IntentRecord
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
    Inbox,
    IntentWrite,
    LedgerAppend,
)
from service.relay.ports import UploadApi
from service.relay.reconcile import Reconciler, TaskLookup
from service.relay.upload_job import SendWindow, UploadJob
from service.scantrust.client import send_window_closed
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


class UploadShutdown:
    """Where the uploaders' shutdown stands (uploaders.py): `Uploaders.drain` moves it
    on, each batch's upload reads it, and marks while its request is under way."""

    def __init__(self) -> None:
        self.stopping = asyncio.Event()  # shutdown began: parked uploads end
        self.deadline_passed = False  # no new attempt starts
        self.sending: set[asyncio.Task[Any]] = set()  # workers with a request under way

    @asynccontextmanager
    async def sending_request(self) -> AsyncIterator[None]:
        """Marks the worker as having a request under way (not cancelled at the deadline)."""
        task = asyncio.current_task()
        if task is not None:
            self.sending.add(task)
        try:
            yield
        finally:
            self.sending.discard(task)

    async def stopped_within(self, wait_s: float) -> bool:
        """Wait `wait_s`, or less if the shutdown starts; True if it did."""
        try:
            async with asyncio.timeout(wait_s):
                await self.stopping.wait()
        except TimeoutError:
            return False
        return True


class TaskLookups:
    """The tasks a batch's uploads created, asked of the API until it answers (every
    failure waited out with the uploads' backoff), as long as the batch is this
    intake's and the shutdown deadline has not passed."""

    def __init__(
        self,
        config: RelayConfig,
        reconciler: Reconciler,
        *,
        owns: Callable[[Batch], bool],
        shutdown: UploadShutdown,
        metrics: RelayMetrics,
        backoff: Backoff,
        rng: random.Random,
    ) -> None:
        self._config = config
        self._reconciler = reconciler
        self._owns = owns
        self._shutdown = shutdown
        self._metrics = metrics
        self._backoff = backoff
        self._rng = rng

    async def look_up(
        self, job: UploadJob, bound: structlog.typing.FilteringBoundLogger
    ) -> list[str] | None:
        """Ask the API for the batch's tasks until it answers; None at the deadline, or
        once the batch's partitions are no longer this intake's (a revoked writer stops
        looking: the new owner resolves the intent)."""
        attempt = 0
        while not self._shutdown.deadline_passed and self._owns(job.batch):
            found = await self._reconciler.find(
                job.batch, job.request, job.first_sent, sends=job.sends
            )
            if isinstance(found, list) and not self._owns(job.batch):
                return None  # answered after the partitions moved: their owner resolves
            if isinstance(found, list):
                self._metrics.reconciliations.labels("task" if found else "none").inc()
                bound.info("batch_reconciled", task_ids=found, reference=job.request.reference)
                return found
            wait = self._wait(found, attempt)
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

    def _wait(self, failure: Failure, attempt: int) -> float:
        if isinstance(failure, Rejected | AuthFailed | Misconfigured | PagesExceeded):
            return self._config.api.retry_max_backoff_s
        return round(retry_wait(failure, attempt, self._backoff, self._rng), 2)


class BatchUploader:
    """Uploads one batch at a time until it is accepted, rejected or given up; the
    retries of uploads are its own (the API client attempts an upload once)."""

    def __init__(
        self,
        config: RelayConfig,
        *,
        api: UploadAndLookupApi,
        committer: Recorder,
        intake: Inbox[BatchRejected | BatchAbandoned],
        health: ApiHealth,
        metrics: RelayMetrics,
        owns: Callable[[Batch], bool],
        rng: random.Random,
        known: KnownTasks,
        shutdown: UploadShutdown,
    ) -> None:
        self._config = config
        self._owns = owns
        self._api = api
        self._known = known
        self._committer = committer
        self._intake = intake
        self._health = health
        self._metrics = metrics
        self._rng = rng
        self._backoff = Backoff(config.api.retry_initial_s, config.api.retry_max_backoff_s)
        self._shutdown = shutdown
        self._lookups = TaskLookups(
            config,
            Reconciler(api, known),
            owns=owns,
            shutdown=shutdown,
            metrics=metrics,
            backoff=self._backoff,
            rng=rng,
        )

    async def upload(
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
        job = UploadJob(batch, self._config, resolving, sources)
        bound = log.bind(batch_id=batch.batch_id, values=batch.size, events=len(job.events))
        attempt = 0
        if resolving is not None:
            found = await self._lookups.look_up(job, bound)
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
        while not self._shutdown.deadline_passed:
            if self._shutdown.stopping.is_set() and self._health.refusal is not None:
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
            async with self._shutdown.sending_request():
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
                        found = await self._lookups.look_up(job, bound)
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
                if await self._shutdown.stopped_within(self._backoff.delay(attempt, self._rng)):
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
        job: UploadJob,
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
        if not self._shutdown.deadline_passed:
            try:
                await append.recorded
            except BatchRevokedError:
                await self._abandon(job, intent, bound)

    async def _abandon(
        self,
        job: UploadJob,
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
        self, job: UploadJob, ambiguous: Ambiguous, bound: structlog.typing.FilteringBoundLogger
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
        return await self._lookups.look_up(job, bound)
