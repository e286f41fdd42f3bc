"""Readiness reasons, with fakes for the two adapters readiness looks at."""

from __future__ import annotations

from typing import Any, cast

from aiokafka.errors import KafkaConnectionError
from prometheus_client import CollectorRegistry

from service.core.contract import DEFAULT_LIMITS
from service.core.resilience import BreakerState
from service.metrics import RelayMetrics
from service.pipeline import Relay, RelayConfig


class FakeAdmin:
    def __init__(self) -> None:
        self.fail = False

    async def list_topics(self) -> list[str]:
        if self.fail:
            raise KafkaConnectionError("connection refused")
        return ["scm.changes"]


class FakeClient:
    breaker_state = BreakerState.CLOSED


def relay(admin: FakeAdmin, client: FakeClient) -> Relay:
    config = RelayConfig(
        input_topic="in",
        results_topic="out",
        dlq_topic="dlq",
        tasks_topic="tasks",
        group_id="g",
        limits=DEFAULT_LIMITS,
    )
    unused = cast(Any, None)
    return Relay(
        config,
        consumer=unused,
        producer=unused,
        ledger_reader=unused,
        poller_consumer=unused,
        admin=cast(Any, admin),
        client=cast(Any, client),
        metrics=RelayMetrics(CollectorRegistry()),
    )


async def test_readiness_names_each_reason_and_recovers() -> None:
    admin, client = FakeAdmin(), FakeClient()
    subject = relay(admin, client)
    assert subject.readiness() == ["starting: reading the ledger"]
    subject._ledger_caught_up.set()
    assert subject.readiness() == []
    admin.fail = True
    await subject.probe_kafka()
    client.breaker_state = BreakerState.OPEN
    assert subject.readiness() == ["Kafka unreachable", "API circuit breaker open"]
    admin.fail = False
    client.breaker_state = BreakerState.CLOSED
    await subject.probe_kafka()
    assert subject.readiness() == []
