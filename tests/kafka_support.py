"""The test session's broker, for tests that run against the real local Kafka broker.

The broker is started once per test session by `tests/conftest.py` (or given by
`SCM_RELAY_TEST_KAFKA=host:port`). Every test gets its own uuid-named topics and
consumer groups (`devkit.harness`), so tests never see each other's records.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from devkit.harness import BrokerError, start_broker, stop_broker

TEST_KAFKA_ENV = "SCM_RELAY_TEST_KAFKA"


@dataclass
class LocalBroker:
    """The broker the test session runs against."""

    bootstrap_servers: str
    started_here: bool

    @classmethod
    def from_environment_or_start(cls) -> LocalBroker:
        """Use `SCM_RELAY_TEST_KAFKA` when set; otherwise start the local broker (of the
        environment's run directory and port)."""
        given = os.environ.get(TEST_KAFKA_ENV, "").strip()
        if given:
            return cls(bootstrap_servers=given, started_here=False)
        return cls(bootstrap_servers=start_broker(None, show_output=True), started_here=True)

    def stop(self) -> None:
        """Stop the broker if this session started it."""
        if self.started_here:
            stopped = stop_broker(None)
            if stopped.returncode != 0:
                raise BrokerError(f"the local Kafka broker did not stop: {stopped.stderr}")
