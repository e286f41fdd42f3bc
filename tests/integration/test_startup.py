"""A relay started while Kafka is down waits for it, alive and not ready, then starts.

As in a maintenance of the whole cluster, or a pod scheduled before the brokers:
the relay points at a loopback port where nothing listens; later a forwarder to
the real broker opens there (the broker's metadata then names its own address).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress

import pytest

from devkit.harness import TopicFactory, make_topics
from service.http import free_port
from tests.api_support import simulator
from tests.integration.test_observability import get_json
from tests.integration.test_pipeline_resilience import STEADY
from tests.pipeline_support import event, publish, relay_settings, results, running_relay

pytestmark = pytest.mark.kafka


@asynccontextmanager
async def forwarding(port: int, target: str) -> AsyncIterator[None]:
    """Accept on 127.0.0.1:`port` and pipe every connection to `target` (host:port)."""
    host, target_port = target.rsplit(":", 1)

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with suppress(ConnectionError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection(host, int(target_port))
        await asyncio.gather(pipe(reader, upstream_writer), pipe(upstream_reader, writer))

    server = await asyncio.start_server(accepted, "127.0.0.1", port)
    try:
        yield
    finally:
        server.close()


async def test_a_relay_started_before_kafka_waits_not_ready_and_starts_when_it_answers(
    kafka_bootstrap: str, topic_factory: TopicFactory
) -> None:
    topics = await make_topics(topic_factory)
    kafka_port, http_port = free_port(), free_port()
    async with simulator(STEADY) as sim:
        settings = relay_settings(
            f"127.0.0.1:{kafka_port}",
            sim.base_url,
            topics,
            http_port=http_port,
            kafka_startup_wait_s=120,
        )
        async with running_relay(settings) as relay:
            await asyncio.sleep(4)
            relay.check_alive()
            status, body = await get_json(http_port, "/readyz")
            assert status == 503, body
            assert body["reasons"] == ["starting: waiting for Kafka"]
            status, body = await get_json(http_port, "/healthz")
            assert status == 200, f"a relay waiting for Kafka is alive: {body}"
            async with forwarding(kafka_port, kafka_bootstrap):
                await publish(
                    kafka_bootstrap,
                    topics.input,
                    [
                        event([f"11W{n:03d}"], scm_data={"batch_number": "W"}, event_id=f"w{n}")
                        for n in range(5)
                    ],
                )
                outcomes = await results(kafka_bootstrap, topics.results, expected=1)
                assert outcomes, "the relay never started once Kafka answered"
                relay.check_alive()
                status, body = await get_json(http_port, "/readyz")
                assert status == 200, body


async def test_a_stop_while_waiting_for_kafka_exits_cleanly_at_once(
    topic_factory: TopicFactory,
) -> None:
    topics = await make_topics(topic_factory)
    async with simulator(STEADY) as sim:
        unanswered = f"127.0.0.1:{free_port()}"
        settings = relay_settings(unanswered, sim.base_url, topics, kafka_startup_wait_s=600)
        async with running_relay(settings) as relay:
            await asyncio.sleep(2)
            relay.check_alive()
            loop = asyncio.get_running_loop()
            started = loop.time()
            relay.stop.set()
            code = await asyncio.wait_for(asyncio.shield(relay.task), 10)
            assert code == 0
            assert loop.time() - started < 5, "a stop must not wait out the start-up wait"
