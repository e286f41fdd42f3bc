"""Run the relay in-process against the real broker and the simulator, and read what it wrote."""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from devkit.harness import (
    Topics,
    assigned_partitions,
    committed_reader,
    end_offsets,
    read_all,
    relay_process,
    wait_until,
)
from service.app import run_relay
from service.settings import Settings
from tests.api_support import TOKEN, Simulator


def relay_settings(bootstrap: str, api_url: str, topics: Topics, **overrides: Any) -> Settings:
    """Settings for a relay in a test: fast linger and polling, quick retries."""
    values: dict[str, Any] = {
        "kafka_bootstrap_servers": bootstrap,
        "kafka_group_id": topics.group,
        "input_topic": topics.input,
        "results_topic": topics.results,
        "dlq_topic": topics.dlq,
        "tasks_topic": topics.tasks,
        "api_base_url": api_url,
        "api_token": TOKEN,
        "batch_linger_ms": 200,
        "poll_initial_s": 0.1,
        "poll_factor": 1.5,
        "poll_max_s": 0.5,
        "api_retry_initial_s": 0.05,
        "api_retry_max_backoff_s": 0.5,
        "api_retry_max_elapsed_s": 2.0,
        "api_breaker_cooldown_s": 1.0,
        # An ambiguous upload is looked up this long after its answer: short in tests.
        "api_request_timeout_s": 5.0,
        "shutdown_timeout_s": 10.0,
        "rebalance_timeout_s": 5.0,
        "http_host": "127.0.0.1",
        "http_port": 0,
    }
    values.update(overrides)
    return Settings(**values)


@dataclass
class RunningRelay:
    """A relay running as a task of the test's event loop."""

    stop: asyncio.Event
    task: asyncio.Task[int]

    def check_alive(self) -> None:
        """Fail at once if the relay has exited."""
        if self.task.done():
            raise AssertionError(f"the relay exited early with {self.task.result()}")


@asynccontextmanager
async def running_relay(settings: Settings) -> AsyncIterator[RunningRelay]:
    """Run the relay as a task; on exit stop it and require a clean exit code."""
    stop = asyncio.Event()
    relay = RunningRelay(stop, asyncio.create_task(run_relay(settings, stop)))
    try:
        yield relay
    finally:
        stop.set()
        code = await asyncio.wait_for(relay.task, timeout=60)
    assert code == 0, f"the relay exited with {code}"


def event(values: list[str] | str, key: str = "extended_id", **fields: Any) -> dict[str, Any]:
    """A change event."""
    return {"constraints": {key: values}, "scm_data": fields.pop("scm_data"), **fields}


async def publish(
    bootstrap: str, topic: str, events: list[Any], key_of: Any = None
) -> list[tuple[int, int]]:
    """Publish events (dicts are JSON-encoded, bytes sent as they are); returns where
    each landed, (partition, offset), in order."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    positions = []
    try:
        for item in events:
            value = item if isinstance(item, bytes) else json.dumps(item).encode()
            key = key_of(item) if key_of else None
            sent = await producer.send_and_wait(topic, value, key=key)
            positions.append((sent.partition, sent.offset))
    finally:
        await producer.stop()
    return positions


async def read_topic(bootstrap: str, topic: str, expected: int, timeout_s: float = 60) -> list[Any]:
    """Read committed records of `topic` from the beginning until `expected` arrived."""
    consumer = committed_reader(bootstrap, topic)
    await consumer.start()
    try:
        return await read_all(consumer, expected, timeout_s=timeout_s)
    finally:
        await consumer.stop()


async def results(
    bootstrap: str, topic: str, expected: int, timeout_s: float = 60
) -> list[dict[str, Any]]:
    """Task outcomes on the results topic."""
    records = await read_topic(bootstrap, topic, expected, timeout_s)
    return [json.loads(record.value) for record in records]


async def committed_offsets(bootstrap: str, group: str, topic: str) -> dict[int, int | None]:
    """The group's committed offset of every partition of `topic`."""
    partitions = list((await end_offsets(bootstrap, topic)).keys())
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False
    )
    await consumer.start()
    try:
        return {p: await consumer.committed(TopicPartition(topic, p)) for p in partitions}
    finally:
        await consumer.stop()


async def wait_for_commit(
    bootstrap: str, topics: Topics, relay: RunningRelay | None = None, timeout_s: float = 60
) -> None:
    """Wait until the relay's group has committed the end of every input partition."""
    ends = await end_offsets(bootstrap, topics.input)
    assert ends, f"no partitions found for {topics.input}"
    committed: dict[int, int | None] = {}

    async def caught_up() -> bool:
        nonlocal committed
        if relay is not None:
            relay.check_alive()
        committed = await committed_offsets(bootstrap, topics.group, topics.input)
        return all((committed.get(p) or 0) >= end for p, end in ends.items())

    await wait_until(
        caught_up,
        what=lambda: f"the input committed to its end: committed {committed}, ends {ends}",
        timeout_s=timeout_s,
        interval_s=0.3,
    )


async def sigkill_while_uploading(
    settings: Settings,
    log: Path,
    sim: Simulator,
    kills: int,
    *,
    uploads: int = 5,
    timeout_s: float = 60,
) -> None:
    """Start the relay process `kills` times, and SIGKILL it each time once the simulator
    has accepted `uploads` more uploads; each must die of that signal."""
    for kill in range(kills):
        async with relay_process(settings, log) as process:
            await sim.wait_uploads(sim.account.stats.uploads_accepted + uploads, timeout_s)
            process.send_signal(signal.SIGKILL)
            assert await process.wait() == -signal.SIGKILL, kill


def holds_partitions(log: Path) -> bool:
    """Whether the relay logging to `log` was last assigned some input partitions."""
    lines = log.read_text().splitlines() if log.exists() else []
    assigned = [line for line in lines if '"partitions_assigned"' in line]
    return bool(assigned) and '"partitions": []' not in assigned[-1]


async def ledger_task_ids(bootstrap: str, topic: str, timeout_s: float = 60) -> list[str]:
    """Task ids of every committed task record (not tombstones, not intents), in log order.

    Reads until the high watermark: a transaction left open by a killed relay holds
    read_committed readers back until the broker aborts it.
    """
    return [
        key.decode()
        for key, value in await ledger_entries(bootstrap, topic, timeout_s)
        if value is not None and not key.startswith((b"intent:", b"progress:"))
    ]


async def open_intents(bootstrap: str, topic: str, timeout_s: float = 60) -> list[str]:
    """Batch ids of the intents in the ledger that were never closed."""
    opened: dict[str, bool] = {}
    for key, value in await ledger_entries(bootstrap, topic, timeout_s):
        if not key.startswith(b"intent:") or value is None:
            continue
        entry = json.loads(value)
        opened[entry["batch_id"]] = entry["kind"] == "intent"
    return sorted(batch_id for batch_id, is_open in opened.items() if is_open)


async def ledger_entries(
    bootstrap: str, topic: str, timeout_s: float = 60
) -> list[tuple[bytes, bytes | None]]:
    """(key, value) of every committed ledger record, tombstones included, in log order."""
    consumer = committed_reader(bootstrap, topic)
    await consumer.start()
    try:
        partitions = await assigned_partitions(consumer, topic)
        await consumer.seek_to_beginning(*partitions)
        ids: list[tuple[bytes, bytes | None]] = []
        deadline = asyncio.get_running_loop().time() + timeout_s
        while True:
            for records in (await consumer.getmany(timeout_ms=200)).values():
                ids.extend((r.key, r.value) for r in records)
            behind = [
                tp
                for tp in partitions
                if await consumer.position(tp) < (consumer.highwater(tp) or 0)
            ]
            if not behind and all(consumer.highwater(tp) is not None for tp in partitions):
                return ids
            assert asyncio.get_running_loop().time() < deadline, "the ledger never settled"
    finally:
        await consumer.stop()
