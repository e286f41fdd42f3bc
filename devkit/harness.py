"""The one harness of the development kit: a local broker, fresh topics, a relay as its
own process, and waits. The demo, the benchmarks, the chaos suite, the simulation and
the tests all start and watch things through it, so each of these exists once.

Not part of the production wheel (the broker script it runs is a source checkout's).
"""

from __future__ import annotations

import asyncio
import inspect
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Final

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from service.settings import Settings, flat_values

REPO_ROOT: Final = Path(__file__).resolve().parents[1]
# The broker script of the source checkout: a real Kafka broker (KRaft) on loopback.
KAFKA_LOCAL: Final = REPO_ROOT / "deploy" / "local-kafka" / "kafka-local"
# Bounds every admin or client call, so a wedged broker fails a run instead of hanging it.
CALL_TIMEOUT_S: Final = 30.0


# --- waits ------------------------------------------------------------------------

# Plain or async, and judged by its truth: a list that is no longer empty will do.
Condition = Callable[[], object]


async def wait_until(
    condition: Condition,
    *,
    what: str | Callable[[], object] = "the condition",
    timeout_s: float = 30.0,
    interval_s: float = 0.05,
) -> float:
    """Poll `condition` (plain or async) every `interval_s` until it is true and return
    the loop's time at which it was seen true; raise TimeoutError naming `what` once
    `timeout_s` have passed without it. `what` may be a callable, asked only then: it
    can say what was seen last. The loop's clock, not the wall's: under the simulation's
    virtual loop a bound is virtual seconds, as the model's timeouts are.

    A condition is polled, not awaited as an event, because what it reads (a fake, a
    broker, a simulator's counters, a log file) does not notify anyone when it changes."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        met = condition()
        if inspect.isawaitable(met):
            met = await met
        if met:
            return loop.time()
        if loop.time() >= deadline:
            awaited = what() if callable(what) else what
            raise TimeoutError(f"timed out after {timeout_s} s waiting for {awaited}")
        await asyncio.sleep(interval_s)


# Unit tests poll in-memory fakes: a short interval, and a short bound so a missed
# condition fails fast.
eventually = partial(wait_until, timeout_s=2.0, interval_s=0.01)


# --- the broker -------------------------------------------------------------------


class BrokerError(RuntimeError):
    """The broker script failed; its messages are in the text (or were shown)."""


def kafka_local(
    run_dir: Path | None,
    *args: str,
    port: int | None = None,
    env: Mapping[str, str] | None = None,
    base: Mapping[str, str] | None = None,
    show_output: bool = False,
    timeout_s: float = 600,
) -> subprocess.CompletedProcess[str]:
    """Run the broker script with `args` in the environment `base` (this process's when
    None) plus `env`. With `run_dir` the broker is that run directory's own, never another
    run's, on a free port unless `port` is given; without, the environment's run
    directory and port. Its output is captured unless `show_output`."""
    environment = {**(os.environ if base is None else base)}
    if run_dir is not None:
        environment["SCM_RELAY_KAFKA_RUN_DIR"] = str(run_dir)
        environment.pop("SCM_RELAY_KAFKA_PORT", None)
    environment.update(env or {})
    if port is not None:
        environment["SCM_RELAY_KAFKA_PORT"] = str(port)
    return subprocess.run(  # noqa: S603 - the checkout's own script
        ["bash", str(KAFKA_LOCAL), *args],  # noqa: S607 - bash from PATH
        env=environment,
        capture_output=not show_output,
        text=True,
        timeout=timeout_s,
        check=False,
    )


def start_broker(
    run_dir: Path | None,
    *,
    env: Mapping[str, str] | None = None,
    base: Mapping[str, str] | None = None,
    show_output: bool = False,
) -> str:
    """Start the broker of `run_dir` (see `kafka_local`) and return its address; a
    broker that started but cannot say where it listens is stopped again."""
    try:
        # A first start fetches the Kafka jars from Maven Central: minutes on a slow link.
        started = kafka_local(
            run_dir, "start", env=env, base=base, show_output=show_output, timeout_s=900
        )
    except subprocess.TimeoutExpired as timeout:
        stop_broker(run_dir, env=env, base=base)
        raise BrokerError("the local Kafka broker did not start within 900 s") from timeout
    if started.returncode != 0:
        said = started.stderr.strip() if started.stderr else "its messages above"
        raise BrokerError(f"the local Kafka broker did not start ({said})")
    try:
        address = kafka_local(run_dir, "address", env=env, base=base, timeout_s=60)
    except subprocess.TimeoutExpired as timeout:
        stop_broker(run_dir, env=env, base=base)
        raise BrokerError("the local Kafka broker gave no address within 60 s") from timeout
    if address.returncode != 0:
        stop_broker(run_dir, env=env, base=base)
        raise BrokerError(f"the local Kafka broker has no address ({address.stderr.strip()})")
    return address.stdout.strip()


def stop_broker(
    run_dir: Path | None,
    *,
    env: Mapping[str, str] | None = None,
    base: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Stop the broker of `run_dir` and delete its data; the caller judges the outcome."""
    return kafka_local(run_dir, "stop", env=env, base=base, timeout_s=120)


@asynccontextmanager
async def local_broker(
    run_dir: Path | None,
    *,
    env: Mapping[str, str] | None = None,
    base: Mapping[str, str] | None = None,
    show_output: bool = False,
) -> AsyncIterator[str]:
    """Start the broker of `run_dir` (see `kafka_local`), yield its address, stop it."""
    address = await asyncio.to_thread(
        partial(start_broker, run_dir, env=env, base=base, show_output=show_output)
    )
    try:
        yield address
    finally:
        stopped = await asyncio.to_thread(partial(stop_broker, run_dir, env=env, base=base))
        if stopped.returncode != 0:
            # Said, not raised: the run's own outcome (or error) stays the one reported.
            print(
                f"warning: the local Kafka broker did not stop cleanly "
                f"(exit {stopped.returncode}): {stopped.stderr.strip()}",
                file=sys.stderr,
            )


# --- topics -----------------------------------------------------------------------


def unique_name(prefix: str) -> str:
    """Return `prefix` plus a uuid: a name no other run uses."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


@dataclass
class Topics:
    """A set of relay topics, and the relay's consumer group on them."""

    input: str
    results: str
    dlq: str
    tasks: str
    group: str

    @classmethod
    def fresh(cls) -> Topics:
        """Names no other run uses."""
        return cls(
            input=unique_name("scm-changes"),
            results=unique_name("scm-results"),
            dlq=unique_name("scm-dlq"),
            tasks=unique_name("scm-tasks"),
            group=unique_name("relay"),
        )

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
    """Creates topics on a broker through one admin client."""

    admin: AIOKafkaAdminClient
    created: list[str] = field(default_factory=list)
    replicas: int = 1
    # In a cluster whose nodes are 1..replicas: the node to lead every partition of
    # every topic created (so that one SIGKILL takes all their leaders).
    leader: int | None = None

    async def create(
        self, prefix: str = "topic", *, partitions: int = 1, config: dict[str, str] | None = None
    ) -> str:
        """Create a fresh uuid-named topic and return its name once the broker lists it."""
        return await self.create_named(unique_name(prefix), partitions=partitions, config=config)

    async def create_named(
        self, name: str, *, partitions: int = 1, config: dict[str, str] | None = None
    ) -> str:
        """Create topic `name` and return it once the broker lists it."""
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


async def make_topics(
    factory: TopicFactory, partitions: int = 3, topics: Topics | None = None
) -> Topics:
    """Create the input, results and dead-letter topics of `topics` (fresh names when
    None); the relay creates the ledger itself."""
    topics = topics or Topics.fresh()
    await factory.create_named(topics.input, partitions=partitions)
    await factory.create_named(topics.results, partitions=partitions)
    await factory.create_named(topics.dlq)
    return topics


@asynccontextmanager
async def admin_client(bootstrap_servers: str) -> AsyncIterator[AIOKafkaAdminClient]:
    """An admin client that is always closed."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers)
    await asyncio.wait_for(admin.start(), timeout=CALL_TIMEOUT_S)
    try:
        yield admin
    finally:
        await admin.close()


# --- reading topics ---------------------------------------------------------------


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

    Returns what was read; the caller judges it, so a shortfall shows the records.
    """
    records: list[Any] = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while len(records) < expected and loop.time() < deadline:
        batches = await consumer.getmany(timeout_ms=200)
        for batch in batches.values():
            records.extend(batch)
    return records


async def assigned_partitions(consumer: AIOKafkaConsumer, topic: str) -> list[TopicPartition]:
    """Wait until a group-less consumer subscribed to `topic` is assigned its partitions."""
    for _ in range(100):
        if consumer.assignment():
            return sorted(consumer.assignment())
        await consumer.getmany(timeout_ms=100)
    raise AssertionError(f"no partitions found for {topic}")


async def end_offsets(bootstrap: str, topic: str) -> dict[int, int]:
    """The end offset (high watermark) of every partition of `topic`."""
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        ends = await consumer.end_offsets(await assigned_partitions(consumer, topic))
        return {tp.partition: offset for tp, offset in ends.items()}
    finally:
        await consumer.stop()


# --- the relay as a process -------------------------------------------------------


def relay_environment(settings: Settings | Mapping[str, Any]) -> dict[str, str]:
    """The environment that gives `scm-relay run` in a subprocess these settings (a
    `Settings`, or flat setting names and values), logging JSON; nothing else of this
    process's SCM_RELAY_* variables."""
    values = flat_values(settings) if isinstance(settings, Settings) else settings
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCM_RELAY_")}
    for name, value in values.items():
        if value is None:
            continue
        if hasattr(value, "get_secret_value"):
            value = value.get_secret_value()
        elif isinstance(value, frozenset | set | list):
            value = ",".join(sorted(value))
        env[f"SCM_RELAY_{name.upper()}"] = str(value)
    env["SCM_RELAY_LOG_FORMAT"] = "json"
    return env


RELAY_COMMAND: Final = (sys.executable, "-m", "service", "run")


@asynccontextmanager
async def relay_process(
    settings: Settings | Mapping[str, Any],
    log_path: Path,
    prefix: tuple[str, ...] = (),
    command: tuple[str, ...] = RELAY_COMMAND,
    *,
    stop_grace_s: float | None = None,
) -> AsyncIterator[asyncio.subprocess.Process]:
    """`python -m service run` (or `command`) as a child process with these settings, its
    output appended to `log_path`. `prefix` runs it through another command (a network
    namespace's `ip netns exec`). On exit it is killed, or with `stop_grace_s` sent
    SIGTERM first and killed only if it has not stopped within that many seconds."""
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
                if stop_grace_s is None:
                    process.kill()
                else:
                    process.terminate()
                    try:
                        await asyncio.wait_for(process.wait(), timeout=stop_grace_s)
                    except TimeoutError:
                        process.kill()
            await process.wait()
