"""The pieces of one batch's upload on their own: the shutdown's phases as an upload
sees them, and the lookups of the tasks an upload may have created."""

from __future__ import annotations

import asyncio
import random

import pytest
import structlog
from prometheus_client import CollectorRegistry

from service.core.batching import Batch
from service.core.resilience import Backoff
from service.metrics import RelayMetrics
from service.relay.batch_upload import TaskLookups, UploadShutdown
from service.relay.ledger import KnownTasks
from service.relay.reconcile import Reconciler
from service.relay.upload_job import UploadJob
from service.scantrust.outcomes import Unavailable
from tests.unit.relay.fakes import FakeApi, config
from tests.unit.relay.support import batch


async def test_a_wait_ends_early_when_the_shutdown_starts_and_says_so() -> None:
    shutdown = UploadShutdown()
    loop = asyncio.get_running_loop()
    started = loop.time()
    waiting = asyncio.create_task(shutdown.stopped_within(5.0))
    await asyncio.sleep(0.01)
    shutdown.stopping.set()
    assert await asyncio.wait_for(waiting, 1) is True
    assert loop.time() - started < 1.0
    assert await UploadShutdown().stopped_within(0.01) is False


async def test_a_request_under_way_is_marked_until_it_ends_even_when_it_fails() -> None:
    shutdown = UploadShutdown()
    seen: list[bool] = []

    async def send() -> None:
        async with shutdown.sending_request():
            seen.append(asyncio.current_task() in shutdown.sending)
            raise RuntimeError("the request failed")

    with pytest.raises(RuntimeError):
        await asyncio.create_task(send())
    assert seen == [True]
    assert shutdown.sending == set()


def lookups(
    api: FakeApi, shutdown: UploadShutdown, owns: list[bool] | None = None
) -> tuple[TaskLookups, RelayMetrics]:
    metrics = RelayMetrics(CollectorRegistry())
    stage_config = config()
    owned = owns if owns is not None else [True]

    def still_owned(_batch: Batch) -> bool:
        return owned[-1]

    found = TaskLookups(
        stage_config,
        Reconciler(api, KnownTasks()),
        owns=still_owned,
        shutdown=shutdown,
        metrics=metrics,
        backoff=Backoff(stage_config.api.retry_initial_s, stage_config.api.retry_max_backoff_s),
        rng=random.Random(7),
    )
    return found, metrics


async def test_a_failed_lookup_is_asked_again_until_the_api_answers() -> None:
    api = FakeApi(lookup_failure=Unavailable("HTTP 503", status=503))
    job = UploadJob(batch(["a"]), config())
    await api.upload(job.request)  # the task the lost answer created
    found, metrics = lookups(api, UploadShutdown())
    tasks = await found.look_up(job, structlog.get_logger())
    assert tasks == ["task-1"]
    assert api.lookups == 2
    reconciled = metrics.registry.get_sample_value(
        "scm_relay_reconciliations_total", {"found": "task"}
    )
    assert reconciled == 1


async def test_no_lookup_once_the_deadline_passed_or_the_partitions_moved() -> None:
    api = FakeApi()
    job = UploadJob(batch(["a"]), config())
    shutdown = UploadShutdown()
    shutdown.deadline_passed = True
    found, _ = lookups(api, shutdown)
    assert await found.look_up(job, structlog.get_logger()) is None
    moved, _ = lookups(api, UploadShutdown(), owns=[False])
    assert await moved.look_up(job, structlog.get_logger()) is None
    assert api.lookups == 0
