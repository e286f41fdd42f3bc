"""Readiness reasons, with fakes for the adapters readiness looks at."""

from __future__ import annotations

from typing import Any, cast

from prometheus_client import CollectorRegistry

from service.core.resilience import BreakerState
from service.metrics import RelayMetrics
from service.relay import Relay
from service.scantrust.outcomes import AuthFailed, Misconfigured
from tests.unit.relay.fakes import FakeAdmin, FakeApi, config


def relay(admin: FakeAdmin, client: FakeApi) -> Relay:
    unused = cast(Any, None)
    return Relay(
        config(),
        consumer=unused,
        producer=unused,
        ledger_reader=unused,
        poller_member=unused,
        admin=admin,
        client=client,
        metrics=RelayMetrics(CollectorRegistry()),
    )


async def test_readiness_names_each_reason_and_recovers() -> None:
    admin, client = FakeAdmin(), FakeApi()
    subject = relay(admin, client)
    assert subject.readiness() == [
        "starting: reading the ledger",
        "starting: checking the API (GET /api/v2/me/)",
    ]
    subject._ledger.caught_up.set()
    subject.health.accepted("me")
    assert subject.readiness() == []
    admin.fail = True
    await subject.probe_kafka()
    client.breaker_state = BreakerState.OPEN
    assert subject.readiness() == ["Kafka unreachable", "API circuit breaker open"]
    admin.fail = False
    client.breaker_state = BreakerState.CLOSED
    await subject.probe_kafka()
    assert subject.readiness() == []
    subject.health.refused("status", AuthFailed(403, "forbidden"))
    subject.health.refused("upload", Misconfigured(404, "Not Found"))
    assert subject.readiness() == [
        "API authentication failed (403)",
        "API refuses the relay's requests (404): check the base URL",
    ]
    subject.health.accepted("status")
    subject.health.upload_accepted()
    assert subject.readiness() == []
