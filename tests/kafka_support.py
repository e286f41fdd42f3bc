"""Helpers for tests that run against the real local Kafka broker.

The broker is started once per test session by `tests/conftest.py` (or given
by `SCM_RELAY_TEST_KAFKA=host:port`). Every test gets its own uuid-named
topics and consumer groups, so tests never see each other's records.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from tests.wait_support import wait_until

REPO_ROOT = Path(__file__).resolve().parent.parent
KAFKA_LOCAL = REPO_ROOT / "deploy" / "local-kafka" / "kafka-local"
TEST_KAFKA_ENV = "SCM_RELAY_TEST_KAFKA"
# Bounds every admin or client call a test makes, so a wedged broker fails a test
# instead of hanging it until the per-test timeout.
CALL_TIMEOUT_S = 30.0


def kafka_local(
    run_dir: Path, *args: str, port: int | None = None, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the kafka-local script on a broker of its own run directory (never the test
    session's broker), with a free port unless `port` is given, plus `env`."""
    environment = {**os.environ, "SCM_RELAY_KAFKA_RUN_DIR": str(run_dir), **(env or {})}
    environment.pop("SCM_RELAY_KAFKA_PORT", None)
    if port is not None:
        environment["SCM_RELAY_KAFKA_PORT"] = str(port)
    return subprocess.run(
        [str(KAFKA_LOCAL), *args],
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def unique_name(prefix: str) -> str:
    """Return `prefix` plus a uuid: a name no other test uses."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


@dataclass
class LocalBroker:
    """The broker the test session runs against."""

    bootstrap_servers: str
    started_here: bool

    @classmethod
    def from_environment_or_start(cls) -> LocalBroker:
        """Use `SCM_RELAY_TEST_KAFKA` when set; otherwise start the local broker."""
        given = os.environ.get(TEST_KAFKA_ENV, "").strip()
        if given:
            return cls(bootstrap_servers=given, started_here=False)
        subprocess.run([str(KAFKA_LOCAL), "start"], check=True, timeout=600)
        address = subprocess.run(
            [str(KAFKA_LOCAL), "address"], check=True, capture_output=True, text=True, timeout=30
        ).stdout.strip()
        return cls(bootstrap_servers=address, started_here=True)

    def stop(self) -> None:
        """Stop the broker if this session started it."""
        if self.started_here:
            subprocess.run([str(KAFKA_LOCAL), "stop"], check=True, timeout=120)


@dataclass
class Topics:
    """A fresh set of relay topics, and the relay's consumer group on them."""

    input: str
    results: str
    dlq: str
    tasks: str
    group: str

    def settings(self) -> dict[str, str]:
        """The relay's settings that name these topics and the group."""
        return {
            "input_topic": self.input,
            "results_topic": self.results,
            "dlq_topic": self.dlq,
            "tasks_topic": self.tasks,
            "kafka_group_id": self.group,
        }


@dataclass
class TopicFactory:
    """Creates uuid-named topics on the test broker through one admin client."""

    admin: AIOKafkaAdminClient
    created: list[str] = field(default_factory=list)
    replicas: int = 1
    # In a cluster whose nodes are 1..replicas: the node to lead every partition of
    # every topic created (so that one SIGKILL takes all their leaders).
    leader: int | None = None

    async def create(
        self, prefix: str = "topic", *, partitions: int = 1, config: dict[str, str] | None = None
    ) -> str:
        """Create a fresh topic and return its name once the broker lists it."""
        name = unique_name(prefix)
        if self.leader is None:
            topic = NewTopic(
                name=name,
                num_partitions=partitions,
                replication_factor=self.replicas,
                topic_configs=config or {},
            )
        else:
            followers = [n for n in range(1, self.replicas + 1) if n != self.leader]
            topic = NewTopic(
                name=name,
                num_partitions=-1,
                replication_factor=-1,
                replica_assignments={p: [self.leader, *followers] for p in range(partitions)},
                topic_configs=config or {},
            )
        response = await asyncio.wait_for(self.admin.create_topics([topic]), timeout=CALL_TIMEOUT_S)
        errors = [(t[0], t[1]) for t in response.topic_errors if t[1] != 0]
        if errors:
            raise RuntimeError(f"create_topics({name}) failed: {errors}")
        self.created.append(name)
        await wait_until(lambda: self._listed(name), what=f"topic {name} to be listed")
        return name

    async def _listed(self, name: str) -> bool:
        return name in await self.admin.list_topics()


@asynccontextmanager
async def admin_client(bootstrap_servers: str) -> AsyncIterator[AIOKafkaAdminClient]:
    """An admin client that is always closed."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers)
    await asyncio.wait_for(admin.start(), timeout=CALL_TIMEOUT_S)
    try:
        yield admin
    finally:
        await admin.close()


def committed_reader(bootstrap: str, topic: str) -> AIOKafkaConsumer:
    """A group-less consumer of `topic` from the beginning, committed records only."""
    return AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        isolation_level="read_committed",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )


async def read_all(
    consumer: AIOKafkaConsumer, expected: int, *, timeout_s: float = CALL_TIMEOUT_S
) -> list[Any]:
    """Read from `consumer` until `expected` records arrived or `timeout_s` passed.

    Returns what was read; the caller asserts on it, so a shortfall shows the records.
    """
    records: list[Any] = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while len(records) < expected and loop.time() < deadline:
        batches = await consumer.getmany(timeout_ms=200)
        for batch in batches.values():
            records.extend(batch)
    return records
