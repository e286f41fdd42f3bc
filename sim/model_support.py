"""One small scenario, run against the real broker and against the in-memory Kafka of
sim/kafka.py, so that tests/repository/test_kafka_model.py can compare what each shows.

A scenario is an async function of a `Cluster`. The model's clients take the same calls
as aiokafka's, so the same code runs twice: on the test's event loop against the broker
(`KafkaCluster`), and on a fresh `VirtualLoop` in a worker thread against a `Broker`
(`in_model`: pytest-asyncio's loop is already running). `asyncio.sleep` and
`loop.time()` are real time in the first run and virtual time in the second.
"""

from __future__ import annotations

import asyncio
import contextvars
import random
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Collection, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from devkit.harness import CALL_TIMEOUT_S, TopicFactory, unique_name, wait_until
from service import fencing
from service.fencing import GroupGeneration
from sim.kafka import Broker, SimAdmin, SimConsumer, SimProducer
from sim.vloop import REPLICA, VirtualLoop
from tests.integration.test_kafka_features import started  # the model's clients too

T = TypeVar("T")

# A read that gets nothing for this long has seen everything the broker holds: aiokafka's
# fetch waits at most fetch_max_wait_ms (500) at the broker before it answers.
SETTLED_MS = 800


class Frozen(ABC):
    """Code running where it can be stopped dead for a while (as by SIGSTOP)."""

    @abstractmethod
    def freeze(self, seconds: float) -> None:
        """Run none of its code for `seconds`; the clock runs on for everyone else."""

    @abstractmethod
    async def result(self) -> None:
        """Wait for the code to end."""


class Cluster(ABC):
    """What a scenario runs against: the real broker or the model."""

    model: bool

    @abstractmethod
    def name(self, prefix: str) -> str:
        """A topic, group or transactional id no other test uses."""

    @abstractmethod
    async def topic(self, prefix: str, *, partitions: int = 1, compacted: bool = False) -> str:
        """Create a topic (compacted: small segments and an eager cleaner)."""

    @abstractmethod
    def producer(self, transactional_id: str, *, transaction_timeout_ms: int = 60_000) -> Any:
        """A transactional producer that sends a `GroupGeneration` as a fenced commit."""

    @abstractmethod
    def consumer(
        self,
        *topics: str,
        group_id: str | None = None,
        client_id: str = "member",
        read_committed: bool = True,
        session_timeout_ms: int = 10_000,
        heartbeat_interval_ms: int = 3_000,
        rebalance_timeout_ms: int | None = None,
        max_poll_interval_ms: int = 300_000,
    ) -> Any:
        """A consumer reading from the beginning, committing nothing by itself."""

    @property
    @abstractmethod
    def admin(self) -> Any:
        """The admin client."""

    @abstractmethod
    def membership(self, consumer: Any, group_id: str) -> GroupGeneration:
        """The generation and member id `consumer` joined `group_id` with."""

    @abstractmethod
    async def compaction(self, topic: str, records: int) -> None:
        """Let the log cleaner compact `topic`, which holds `records` records."""

    @abstractmethod
    def spawn(self, name: str, body: Callable[[], Coroutine[Any, Any, None]]) -> Frozen:
        """Run `body` where it can be frozen."""


# -- the real broker ----------------------------------------------------------------------


class KafkaCluster(Cluster):
    model = False

    def __init__(self, bootstrap: str, topics: TopicFactory) -> None:
        self._bootstrap = bootstrap
        self._topics = topics
        self._threads: list[_Thread] = []

    def name(self, prefix: str) -> str:
        return unique_name(prefix)

    async def topic(self, prefix: str, *, partitions: int = 1, compacted: bool = False) -> str:
        config = None
        if compacted:
            config = {
                "cleanup.policy": "compact",
                "segment.ms": "200",
                "min.cleanable.dirty.ratio": "0.01",
                "min.compaction.lag.ms": "0",
                # Tombstones outlive the test: the model never removes them.
                "delete.retention.ms": "86400000",
            }
        return await self._topics.create(prefix, partitions=partitions, config=config)

    def producer(self, transactional_id: str, *, transaction_timeout_ms: int = 60_000) -> Any:
        producer = AIOKafkaProducer(
            bootstrap_servers=self._bootstrap,
            transactional_id=transactional_id,
            transaction_timeout_ms=transaction_timeout_ms,
            enable_idempotence=True,
            acks="all",
        )
        fencing.install(producer)
        return producer

    def consumer(
        self,
        *topics: str,
        group_id: str | None = None,
        client_id: str = "member",
        read_committed: bool = True,
        session_timeout_ms: int = 10_000,
        heartbeat_interval_ms: int = 3_000,
        rebalance_timeout_ms: int | None = None,
        max_poll_interval_ms: int = 300_000,
    ) -> Any:
        return AIOKafkaConsumer(
            *topics,
            bootstrap_servers=self._bootstrap,
            group_id=group_id,
            client_id=client_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            isolation_level="read_committed" if read_committed else "read_uncommitted",
            session_timeout_ms=session_timeout_ms,
            heartbeat_interval_ms=heartbeat_interval_ms,
            rebalance_timeout_ms=rebalance_timeout_ms,
            max_poll_interval_ms=max_poll_interval_ms,
        )

    @property
    def admin(self) -> AIOKafkaAdminClient:
        return self._topics.admin

    def membership(self, consumer: Any, group_id: str) -> GroupGeneration:
        return fencing.membership(consumer, group_id)

    async def compaction(self, topic: str, records: int) -> None:
        # The cleaner cleans every closed segment of a partition in one pass: once a reader
        # finds fewer records than were written, that pass is over.
        async def cleaned() -> bool:
            async with started(self.consumer(topic, read_committed=False)) as reader:
                return len(await drain(reader)) < records

        await wait_until(
            cleaned, what=f"the log cleaner to compact {topic}", timeout_s=60, interval_s=0.5
        )

    def spawn(self, name: str, body: Callable[[], Coroutine[Any, Any, None]]) -> Frozen:
        thread = _Thread(name, body)
        self._threads.append(thread)
        return thread

    def close(self) -> None:
        threads, self._threads = self._threads, []
        for thread in threads:
            thread.close()


class _Thread(Frozen):
    """An event loop of its own in a thread: blocking that loop stops every client on it
    (heartbeats included), as SIGSTOP stops a process, while the broker runs on."""

    def __init__(self, name: str, body: Callable[[], Coroutine[Any, Any, None]]) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=name, daemon=True)
        self._thread.start()
        self._future = asyncio.run_coroutine_threadsafe(body(), self._loop)

    def freeze(self, seconds: float) -> None:
        self._loop.call_soon_threadsafe(time.sleep, seconds)

    async def result(self) -> None:
        await asyncio.wrap_future(self._future)

    def close(self) -> None:
        self._future.cancel()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=CALL_TIMEOUT_S)
        if not self._thread.is_alive():
            self._loop.close()


# -- the model ----------------------------------------------------------------------------


class ModelCluster(Cluster):
    model = True

    def __init__(self, loop: VirtualLoop, broker: Broker) -> None:
        self.loop = loop
        self.broker = broker
        self._names = 0

    def name(self, prefix: str) -> str:
        self._names += 1
        return f"{prefix}-{self._names}"

    async def topic(self, prefix: str, *, partitions: int = 1, compacted: bool = False) -> str:
        name = self.name(prefix)
        self.broker.create_topic(name, partitions, compacted=compacted)
        return name

    def producer(self, transactional_id: str, *, transaction_timeout_ms: int = 60_000) -> Any:
        # The model's transaction timeout is the broker's: the relay's producers share one.
        self.broker.transaction_timeout_s = transaction_timeout_ms / 1000
        return SimProducer(self.broker, transactional_id)

    def consumer(
        self,
        *topics: str,
        group_id: str | None = None,
        client_id: str = "member",
        read_committed: bool = True,
        session_timeout_ms: int = 10_000,
        heartbeat_interval_ms: int = 3_000,
        rebalance_timeout_ms: int | None = None,
        max_poll_interval_ms: int = 300_000,
    ) -> Any:
        return SimConsumer(
            self.broker,
            client_id=client_id,
            group_id=group_id,
            topics=topics,
            read_committed=read_committed,
            session_timeout_s=session_timeout_ms / 1000,
            heartbeat_interval_s=heartbeat_interval_ms / 1000,
            # aiokafka's default rebalance timeout is the session timeout.
            rebalance_timeout_s=(rebalance_timeout_ms or session_timeout_ms) / 1000,
            max_poll_interval_s=max_poll_interval_ms / 1000,
        )

    @property
    def admin(self) -> SimAdmin:
        return SimAdmin(self.broker)

    def membership(self, consumer: Any, group_id: str) -> GroupGeneration:
        return GroupGeneration(group_id, consumer.generation, consumer.member_id, None)

    async def compaction(self, topic: str, records: int) -> None:
        # The real test topics roll their segment after 200 ms (segment.ms).
        self.broker.compact(topic, active_segment_s=0.2)

    def spawn(self, name: str, body: Callable[[], Coroutine[Any, Any, None]]) -> Frozen:
        context = contextvars.copy_context()
        context.run(REPLICA.set, name)
        return _Replica(self.loop, name, self.loop.create_task(body(), context=context))


@dataclass
class _Replica(Frozen):
    loop: VirtualLoop
    replica: str
    task: asyncio.Task[None]

    def freeze(self, seconds: float) -> None:
        self.loop.pause(self.replica)
        self.loop.call_later(seconds, self.loop.resume, self.replica)

    async def result(self) -> None:
        await self.task


def run_model(scenario: Callable[[Cluster], Coroutine[Any, Any, T]]) -> T:
    """Run `scenario` against the model, on a virtual loop of its own."""
    loop = VirtualLoop()
    broker = Broker(loop, random.Random(0))

    async def main() -> T:
        broker.start()
        return await scenario(ModelCluster(loop, broker))

    try:
        result = loop.run_until_complete(main())
        assert loop.stalled is None, loop.stalled
        return result
    finally:
        close(loop)


def close(loop: VirtualLoop) -> None:
    """End every task still there (paused and killed replicas' too), then the loop."""
    loop.wind_down()  # (after a busy loop too: the tasks still end)
    pending = [task for task in asyncio.all_tasks(loop) if not task.done()]
    for task in pending:
        task.cancel()
    if pending:
        loop.run_until_complete(asyncio.wait(pending, timeout=60.0))
    loop.close()


async def in_model(scenario: Callable[[Cluster], Coroutine[Any, Any, T]]) -> T:
    return await asyncio.to_thread(run_model, scenario)


async def on_both(
    kafka: KafkaCluster, scenario: Callable[[Cluster], Coroutine[Any, Any, T]]
) -> tuple[T, T]:
    """What `scenario` shows against the broker, and against the model."""
    try:
        real = await scenario(kafka)
    finally:
        kafka.close()
    return real, await in_model(scenario)


# -- observations -------------------------------------------------------------------------


async def send(
    producer: Any,
    topic: str,
    value: bytes | None,
    key: bytes | None = None,
    partition: int | None = None,
) -> None:
    """Send and wait until the broker has the record."""
    await (await producer.send(topic, value, key=key, partition=partition))


async def attempt(call: Awaitable[Any]) -> str:
    """'ok', or the name of what `call` raised (with the group's refusal for a fenced
    commit: the Kafka error named in its message)."""
    try:
        await call
    except Exception as exc:  # noqa: BLE001 - what is raised is the observation
        name = type(exc).__name__
        if isinstance(exc, fencing.GroupFencedError):
            for refusal in ("IllegalGenerationError", "UnknownMemberIdError"):
                if refusal in str(exc):
                    return f"{name}: {refusal}"
        return name
    return "ok"


async def drain(consumer: Any, *partitions: TopicPartition) -> list[tuple[Any, ...]]:
    """Every record a consumer can read now: (partition, offset, key, value)."""
    records: list[tuple[Any, ...]] = []
    while True:
        batches = await consumer.getmany(*partitions, timeout_ms=SETTLED_MS)
        if not batches:
            return records
        for batch in batches.values():
            records += [(r.partition, r.offset, r.key, r.value) for r in batch]


def numbers(partitions: Collection[TopicPartition]) -> list[int]:
    return sorted(tp.partition for tp in partitions)


@dataclass(frozen=True)
class Event:
    """A rebalance callback as a member saw it: the generation and whether it had a member
    id when the callback ran."""

    member: str
    what: str
    partitions: tuple[int, ...] = ()
    generation: int | None = None
    member_id_known: bool | None = None


class Recorder(ConsumerRebalanceListener):  # type: ignore[misc]
    """Writes each rebalance callback into `events` (with the time, into `times`); a
    revocation of something takes `revoke_s`."""

    def __init__(
        self,
        member: str,
        who: Callable[[], GroupGeneration],
        events: list[Event],
        times: dict[Event, float],
        revoke_s: float = 0.0,
    ) -> None:
        self._member = member
        self._who = who
        self._events = events
        self._times = times
        self._revoke_s = revoke_s

    def note(self, what: str, partitions: Collection[TopicPartition] = (), *, group: bool) -> None:
        membership = self._who() if group else None
        event = Event(
            self._member,
            what,
            tuple(numbers(partitions)),
            membership.generation_id if membership else None,
            bool(membership.member_id) if membership else None,
        )
        self._events.append(event)
        self._times.setdefault(event, asyncio.get_running_loop().time())

    async def on_partitions_revoked(self, revoked: Any) -> None:
        self.note("revoked", revoked, group=True)
        if revoked and self._revoke_s:
            await asyncio.sleep(self._revoke_s)
            self.note("revoke done", group=False)

    async def on_partitions_assigned(self, assigned: Any) -> None:
        self.note("assigned", assigned, group=True)


def of(events: list[Event], member: str) -> list[Event]:
    return [event for event in events if event.member == member]
