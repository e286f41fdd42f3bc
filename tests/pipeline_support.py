"""Run the relay in-process against the real broker and the simulator, and read what it wrote."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from service.app import run_relay
from service.settings import Settings, flat_values
from tests.api_support import TOKEN, Simulator
from tests.kafka_support import TopicFactory, Topics, committed_reader, read_all, unique_name


async def make_topics(factory: TopicFactory, partitions: int = 3) -> Topics:
    """Input, results and dead-letter topics; the relay creates the ledger itself."""
    return Topics(
        input=await factory.create("scm-changes", partitions=partitions),
        results=await factory.create("scm-results", partitions=partitions),
        dlq=await factory.create("scm-dlq"),
        tasks=unique_name("scm-tasks"),
        group=unique_name("relay"),
    )


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


async def assigned_partitions(consumer: AIOKafkaConsumer, topic: str) -> list[TopicPartition]:
    """Wait until a group-less consumer subscribed to `topic` is assigned its partitions."""
    for _ in range(100):
        if consumer.assignment():
            return sorted(consumer.assignment())
        await consumer.getmany(timeout_ms=100)
    raise AssertionError(f"no partitions found for {topic}")


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


async def end_offsets(bootstrap: str, topic: str) -> dict[int, int]:
    """The end offset of every partition of `topic`."""
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        ends = await consumer.end_offsets(await assigned_partitions(consumer, topic))
        return {tp.partition: offset for tp, offset in ends.items()}
    finally:
        await consumer.stop()


async def wait_for_commit(
    bootstrap: str, topics: Topics, relay: RunningRelay | None = None, timeout_s: float = 60
) -> None:
    """Wait until the relay's group has committed the end of every input partition."""
    ends = await end_offsets(bootstrap, topics.input)
    assert ends, f"no partitions found for {topics.input}"
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        if relay is not None:
            relay.check_alive()
        committed = await committed_offsets(bootstrap, topics.group, topics.input)
        if all((committed.get(p) or 0) >= end for p, end in ends.items()):
            return
        assert asyncio.get_running_loop().time() < deadline, (committed, ends)
        await asyncio.sleep(0.3)


def relay_environment(settings: Settings) -> dict[str, str]:
    """The environment that gives `scm-relay run` in a subprocess these settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCM_RELAY_")}
    for name, value in flat_values(settings).items():
        if value is None:
            continue
        if hasattr(value, "get_secret_value"):
            value = value.get_secret_value()
        elif isinstance(value, frozenset | set | list):
            value = ",".join(sorted(value))
        env[f"SCM_RELAY_{name.upper()}"] = str(value)
    env["SCM_RELAY_LOG_FORMAT"] = "json"
    return env


@asynccontextmanager
async def relay_process(
    settings: Settings,
    log_path: Path,
    prefix: tuple[str, ...] = (),
    command: tuple[str, ...] = (sys.executable, "-m", "service", "run"),
) -> AsyncIterator[asyncio.subprocess.Process]:
    """`python -m service run` (or `command`) as a child process, its log in `log_path`;
    killed on exit. `prefix` runs it through another command (a network namespace's
    `ip netns exec`)."""
    with log_path.open("ab") as log_file:
        process = await asyncio.create_subprocess_exec(
            *prefix,
            *command,
            env=relay_environment(settings),
            stdout=log_file,
            stderr=log_file,
        )
        try:
            yield process
        finally:
            if process.returncode is None:
                process.kill()
            await process.wait()


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
