"""Session-wide fixtures: the real Kafka broker and per-test topic and group names."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator

import pytest
from hypothesis import settings

from devkit.harness import TopicFactory, admin_client, unique_name
from tests.kafka_support import LocalBroker

# Property tests judge results, never speed: hypothesis's per-example deadline (200 ms)
# turned a busy shared machine into a failure (DeadlineExceeded) of a correct test.
settings.register_profile("no-deadline", deadline=None)
settings.load_profile("no-deadline")


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
