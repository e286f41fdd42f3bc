"""A real Prometheus (Debian's package) scrapes a running relay with the shipped rules:
a failed task and a short task make their alerts active."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from devkit.harness import TopicFactory, make_topics
from devkit.simulator.state import Faults
from service.http import free_port
from tests.api_support import simulator
from tests.pipeline_support import (
    event,
    publish,
    relay_settings,
    results,
    running_relay,
    wait_for_commit,
)

pytestmark = pytest.mark.kafka
RULES = Path(__file__).resolve().parents[2] / "deploy" / "prometheus" / "alerts.yml"


@asynccontextmanager
async def prometheus(scrape_port: int, workdir: Path) -> AsyncIterator[str]:
    """Prometheus on loopback scraping 127.0.0.1:`scrape_port` every second."""
    binary = shutil.which("prometheus")
    assert binary, "Debian's prometheus package is missing (make setup installs it)"
    port = free_port()
    config = workdir / "prometheus.yml"
    config.write_text(
        json.dumps(
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "rule_files": [str(RULES)],
                "scrape_configs": [
                    {
                        "job_name": "scm-relay",
                        "static_configs": [{"targets": [f"127.0.0.1:{scrape_port}"]}],
                    }
                ],
            }
        )
    )
    with (workdir / "prometheus.log").open("wb") as log:
        process = await asyncio.create_subprocess_exec(
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            stdout=asyncio.subprocess.DEVNULL,
            stderr=log,
        )
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            process.terminate()
            await asyncio.wait_for(process.wait(), 30)


async def active_alerts(base_url: str) -> set[str]:
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"{base_url}/api/v1/alerts") as r,
        ):
            body: dict[str, Any] = await r.json()
    except aiohttp.ClientError:
        return set()
    return {a["labels"]["alertname"] for a in body["data"]["alerts"] if a["state"] == "firing"}


async def query(base_url: str, expression: str) -> list[float]:
    """Values of an instant query (empty while Prometheus has no sample)."""
    url = f"{base_url}/api/v1/query"
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.get(url, params={"query": expression}) as response,
        ):
            body: dict[str, Any] = await response.json()
    except aiohttp.ClientError:
        return []
    return [float(item["value"][1]) for item in body["data"]["result"]]


async def test_failed_and_short_tasks_fire_their_alerts_in_prometheus(
    kafka_bootstrap: str, topic_factory: TopicFactory, tmp_path: Path
) -> None:
    topics = await make_topics(topic_factory, partitions=1)
    port = free_port()
    async with simulator(Faults(fail_reference="fails", jitter_s=0)) as sim:
        settings = relay_settings(kafka_bootstrap, sim.base_url, topics, http_port=port)
        async with running_relay(settings) as relay, prometheus(port, tmp_path) as prom:
            # Prometheus must see the counters at zero before anything happens.
            for _ in range(60):
                if await query(prom, 'scm_relay_tasks_finished_total{state="failed"}') == [0.0]:
                    break
                await asyncio.sleep(0.5)
            assert await active_alerts(prom) == set()
            await publish(
                kafka_bootstrap,
                topics.input,
                [
                    event(
                        ["11X000001", "GHOST"], scm_data={"batch_number": "S"}, reference="short"
                    ),
                    event(["11X000002"], scm_data={"batch_number": "F"}, reference="fails"),
                ],
            )
            await wait_for_commit(kafka_bootstrap, topics, relay)
            await results(kafka_bootstrap, topics.results, expected=2)
            firing: set[str] = set()
            for _ in range(60):
                firing = await active_alerts(prom)
                if {"ScmRelayTaskFailed", "ScmRelayTaskShort"} <= firing:
                    break
                await asyncio.sleep(0.5)
    assert {"ScmRelayTaskFailed", "ScmRelayTaskShort"} <= firing, firing
