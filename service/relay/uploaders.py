"""The uploaders: take ready batches, upload each to the API, hand the outcome on.

They own the upload queue, its workers and the shutdown's phases; each batch's
upload, and its retries, are `BatchUploader`'s (batch_upload.py): the API client
attempts an upload once, and only there is it known whether a resend is safe.
An accepted batch becomes a ledger record for the committer; a rejected one
becomes dead letters and a message to intake that its claims end; an
authentication failure parks the upload (nothing is lost, intake stops) until
the relay stops; an ambiguous answer is looked up before anything is sent again.

Shutdown (`drain`) is bounded twice: queued and final batches are uploaded until
the shutdown deadline; then no new attempt starts, uploads whose request is
under way get the grace to finish (cancelling one after it was sent would leave
a task nobody recorded), and every other uploader is cancelled at once.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable

import structlog

from service.core.batching import Batch
from service.metrics import RelayMetrics
from service.relay.batch_upload import (
    BatchUploader,
    Recorder,
    UploadAndLookupApi,
    UploadShutdown,
)
from service.relay.config import RelayConfig
from service.relay.health import ApiHealth
from service.relay.ledger import KnownTasks
from service.relay.messages import (
    BatchAbandoned,
    BatchRejected,
    EndOfStream,
    Inbox,
    Mailbox,
    Resolution,
)

log = structlog.get_logger(__name__)


class Uploaders:
    """`max_in_flight_requests` workers over one bounded queue of ready batches."""

    def __init__(
        self,
        config: RelayConfig,
        *,
        api: UploadAndLookupApi,
        committer: Recorder,
        intake: Inbox[BatchRejected | BatchAbandoned],
        health: ApiHealth,
        metrics: RelayMetrics,
        owns: Callable[[Batch], bool] = lambda _batch: True,
        rng: random.Random | None = None,
        known: KnownTasks | None = None,
    ) -> None:
        self._config = config
        self._shutdown = UploadShutdown()
        self._uploader = BatchUploader(
            config,
            api=api,
            committer=committer,
            intake=intake,
            health=health,
            metrics=metrics,
            owns=owns,
            rng=rng or random.Random(),  # noqa: S311 - jitter, not cryptography
            # Shared with the ledger view, which notes every task the ledger holds.
            known=known if known is not None else KnownTasks(),
            shutdown=self._shutdown,
        )
        # An end of the stream tells one worker to end.
        self._inbox: Mailbox[Batch | Resolution] = Mailbox(
            config.batching.max_in_flight_requests * 2
        )
        self._workers: list[asyncio.Task[None]] = []
        self._finished = asyncio.Event()  # every worker has ended

    async def put(self, batch: Batch | Resolution) -> None:
        """Queue a batch, or an intent to resolve (waits for room)."""
        await self._inbox.tell(batch)

    @property
    def idle(self) -> bool:
        """Nothing queued: a free uploader would take a batch at once."""
        return self._inbox.empty

    def take_queued(self) -> list[Batch]:
        """Take back the batches no uploader has started (a rebalance)."""
        return [job.batch if isinstance(job, Resolution) else job for job in self._inbox.take_all()]

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
        self._shutdown.stopping.set()
        pending = list(final)
        try:
            async with asyncio.timeout(timeout_s):
                while pending:
                    await self._inbox.tell(pending[0])
                    pending.pop(0)
                for _ in range(self._config.batching.max_in_flight_requests):
                    await self._inbox.end()
                await self._finished.wait()
        except TimeoutError:
            pass
        self._shutdown.deadline_passed = True
        for worker in self._workers:
            if worker not in self._shutdown.sending:
                worker.cancel()
        late: set[asyncio.Task[None]] = set()
        if self._shutdown.sending:
            _, late = await asyncio.wait(set(self._shutdown.sending), timeout=grace_s)
            for worker in late:
                worker.cancel()
        unsent = len(pending) + len(self.take_queued())
        if late or unsent:
            log.warning(
                "relay_shutdown_deadline", unsent_batches=unsent, cancelled_uploads=len(late)
            )

    async def _work(self) -> None:
        while not isinstance(job := await self._inbox.next(), EndOfStream):
            if isinstance(job, Resolution):
                await self._uploader.upload(job.batch, job.intent, job.sources)
            else:
                await self._uploader.upload(job)
            if self._shutdown.deadline_passed:
                return
