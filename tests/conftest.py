"""Session-wide fixtures: the real Kafka broker and per-test topic and group names."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
import structlog
from hypothesis import settings

from devkit.harness import TopicFactory, admin_client, unique_name
from tests.kafka_support import LocalBroker

# Property tests judge results, never speed: hypothesis's per-example deadline (200 ms)
# turned a busy shared machine into a failure (DeadlineExceeded) of a correct test.
settings.register_profile("no-deadline", deadline=None)
settings.load_profile("no-deadline")


@pytest.fixture(scope="session", autouse=True)
def loggers_never_cached() -> Iterator[None]:
    """Tests read logs through `structlog.testing.capture_logs`, which swaps only the
    processors for its block. The relay's `configure_logging` caches each logger on
    first use (right in production), so a test that configured logging (a tool run in
    process, the demo) froze every logger it touched on its configuration, and a later
    test's `capture_logs` saw nothing of them. In tests no logger is cached."""
    configure = structlog.configure

    def uncached(**options: Any) -> None:
        configure(**{**options, "cache_logger_on_first_use": False})

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(structlog, "configure", uncached)
        yield


@pytest.fixture(autouse=True)
def logging_as_structlog_defaults() -> Iterator[None]:
    """Each test starts from structlog's defaults: a test that configured logging at
    WARNING (the demo does) left its level filter in place, and `capture_logs` keeps the
    filter, so a later test's info lines were dropped before they were captured. Which
    tests failed depended on the order they ran in."""
    structlog.reset_defaults()
    yield
    structlog.reset_defaults()


@pytest.fixture(scope="session")
def kafka_broker() -> Iterator[LocalBroker]:
    """The broker for this test run, started once (unless SCM_RELAY_TEST_KAFKA names one)."""
    broker = LocalBroker.from_environment_or_start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture
def kafka_bootstrap(kafka_broker: LocalBroker) -> str:
    """`host:port` of the test broker."""
    return kafka_broker.bootstrap_servers


@pytest.fixture
async def topic_factory(kafka_bootstrap: str) -> AsyncIterator[TopicFactory]:
    """Creates uuid-named topics; they are left for the broker's data dir to take away."""
    async with admin_client(kafka_bootstrap) as admin:
        yield TopicFactory(admin)


@pytest.fixture
def group_id_factory() -> Callable[[str], str]:
    """Returns fresh uuid-named consumer group ids (or transactional ids)."""
    return unique_name


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Refuse a test that uses the broker without the `kafka` marker, so `-m` selections hold."""
    unmarked = [
        item.nodeid
        for item in items
        if "kafka_broker" in getattr(item, "fixturenames", ())
        and item.get_closest_marker("kafka") is None
    ]
    if unmarked:
        raise pytest.UsageError(
            f"tests use the Kafka broker without @pytest.mark.kafka: {unmarked}"
        )
