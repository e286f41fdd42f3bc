"""Metrics, health and readiness of a running relay, scraped over HTTP."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

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
DOCS = Path(__file__).resolve().parents[2] / "docs"
# Every metric docs/design.md section 5 asks for, by its exported name.
DESIGN_METRICS = {
    "scm_relay_events_consumed_total",
    "scm_relay_events_invalid_total",
    "scm_relay_events_deduplicated_total",
    "scm_relay_batches_submitted_total",
    "scm_relay_batch_values",
    "scm_relay_api_requests_total",
    "scm_relay_api_request_duration_seconds",
    "scm_relay_api_retries_total",
    "scm_relay_api_throttled_total",
    "scm_relay_api_circuit_breaker_state",
    "scm_relay_ambiguous_submissions_total",
    "scm_relay_tasks_pending",
    "scm_relay_tasks_finished_total",
    "scm_relay_tasks_short_total",
    "scm_relay_tasks_short_codes_total",
    "scm_relay_task_duration_seconds",
    "scm_relay_oldest_pending_task_age_seconds",
    "scm_relay_consumer_lag",
    "scm_relay_intake_paused",
    "scm_relay_ready",
    "scm_relay_last_commit_timestamp_seconds",
}


async def scrape(port: int) -> dict[str, list[tuple[dict[str, str], float]]]:
    url = f"http://127.0.0.1:{port}/metrics"
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        assert response.status == 200
        text = await response.text()
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
            samples.setdefault(family.name, [])
    return samples


def value(
    samples: dict[str, list[tuple[dict[str, str], float]]], name: str, **labels: str
) -> float:
    return sum(
        found
        for have, found in samples.get(name, [])
        if all(have.get(key) == want for key, want in labels.items())
    )


async def get_json(port: int, path: str) -> tuple[int, dict[str, object]]:
    url = f"http://127.0.0.1:{port}{path}"
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return response.status, await response.json()


async def test_a_running_relay_exports_every_design_metric_and_answers_health(
    kafka_bootstrap: str, topic_factory: TopicFactory
) -> None:
    topics = await make_topics(topic_factory, partitions=2)
    port = free_port()
    events = [
        event(["11X000001", "11X000002", "GHOST"], scm_data={"batch_number": "A"}),
        event(["11X000003"], scm_data={"batch_number": "B"}, reference="fails"),
        b"not json",
    ]
    async with simulator(Faults(fail_reference="fails", jitter_s=0)) as sim:
        settings = relay_settings(kafka_bootstrap, sim.base_url, topics, http_port=port)
        await publish(kafka_bootstrap, topics.input, events)
        async with running_relay(settings) as relay:
            await wait_for_commit(kafka_bootstrap, topics, relay)
            await results(kafka_bootstrap, topics.results, expected=2)
            await asyncio.sleep(1.5)  # one heartbeat refreshes the gauges
            samples = await scrape(port)
            assert await get_json(port, "/healthz") == (
                200,
                {"status": "ok", "heartbeat_age_s": pytest.approx(0.5, abs=1.5)},
            )
            assert await get_json(port, "/readyz") == (200, {"ready": True})
            await sim.set_faults(forbidden=True)
            await publish(
                kafka_bootstrap, topics.input, [event(["11X000009"], scm_data={"lot": "C"})]
            )
            for _ in range(100):
                status, body = await get_json(port, "/readyz")
                if status == 503:
                    break
                await asyncio.sleep(0.1)
            assert (status, body) == (
                503,
                {"ready": False, "reasons": ["API authentication failed (403)"]},
            )
            auth_samples = await scrape(port)
    missing = DESIGN_METRICS - set(samples)
    assert not missing, f"not exported: {sorted(missing)}"
    assert value(samples, "scm_relay_events_consumed_total") == 3
    assert value(samples, "scm_relay_events_invalid_total", reason="invalid_json") == 1
    assert value(samples, "scm_relay_tasks_finished_total", state="complete") == 1
    assert value(samples, "scm_relay_tasks_finished_total", state="failed") == 1
    assert value(samples, "scm_relay_tasks_short_total") == 1
    assert value(samples, "scm_relay_tasks_short_codes_total") == 1
    assert value(samples, "scm_relay_ready") == 1
    assert (
        value(samples, "scm_relay_api_requests_total", endpoint="upload", status_class="2xx") == 2
    )
    assert value(samples, "scm_relay_last_commit_timestamp_seconds") > 0
    assert value(auth_samples, "scm_relay_api_auth_failed") == 1
    assert value(auth_samples, "scm_relay_ready") == 0


def test_docs_describe_every_exported_metric() -> None:
    from prometheus_client import CollectorRegistry

    from service.metrics import RelayMetrics

    registry = CollectorRegistry()
    RelayMetrics(registry)
    documented = set(re.findall(r"`(scm_relay_[a-z_]+)`", (DOCS / "metrics.md").read_text()))
    counters = {f"{m.name}_total" for m in registry.collect() if m.type == "counter"}
    names = {m.name for m in registry.collect() if m.type != "counter"} | counters
    assert names - documented == set(), "metrics missing from docs/metrics.md"
    assert documented - names == set(), "docs/metrics.md names metrics that do not exist"
