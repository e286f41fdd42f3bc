"""The in-memory Kafka of the simulation (sim/kafka.py) against the real broker.

Each rule the model's docstring lists is a small scenario here, run twice by the same
code: against the local broker with aiokafka's clients (and service/fencing.py's fenced
commits, as service/app.py builds them), and against the model on a virtual loop. The
test asserts that both show the same: records and their offsets, positions, high
watermarks, committed offsets, the errors each call raised, the rebalance callbacks
each member saw (with the generation it was in) and which partitions it got. A few
assertions on the broker's side say what the rule is, so that an agreement of two wrong
answers fails too.

Not compared, because Kafka gives no answer to compare: where a keyless record goes (the
producer picks at random; the model draws from the seed), and which error a producer
raises for its second call after it was fenced (aiokafka's producer turns fatal once its
sender task has seen the fencing, which races with the caller: ProducerFenced,
AssertionError or IllegalOperation; both must raise).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any

import pytest
from aiokafka import TopicPartition
from aiokafka.partitioner import murmur2
from aiokafka.structs import OffsetAndMetadata

from devkit.harness import TopicFactory, wait_until
from service.fencing import GroupGeneration
from sim.model_support import (
    Cluster,
    Event,
    KafkaCluster,
    Recorder,
    attempt,
    drain,
    numbers,
    of,
    on_both,
    send,
)
from tests.integration.test_kafka_features import started

pytestmark = pytest.mark.kafka

# The broker's transaction.abort.timed.out.transaction.cleanup.interval.ms (its default):
# a transaction past its timeout is aborted at the next of these sweeps.
TXN_SWEEP_S = 10.0
# The broker's group.min.session.timeout.ms (its default): no session can be shorter.
SESSION_MS = 6_000
HEARTBEAT_MS = 500


@pytest.fixture
async def kafka(kafka_bootstrap: str, topic_factory: TopicFactory) -> AsyncIterator[KafkaCluster]:
    cluster = KafkaCluster(kafka_bootstrap, topic_factory)
    try:
        yield cluster
    finally:
        cluster.close()


async def committed_offset(
    cluster: Cluster,
    group: str,
    tp: TopicPartition,
    done: Callable[[tuple[int, str]], bool] = lambda point: False,
) -> tuple[int, str]:
    """The group's committed offset of `tp` once `done` holds, or after 2 s: transactional
    offsets are readable only once the broker has written the commit markers, which it
    does just after `commit_transaction` returned."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 2.0
    while True:
        point = (await cluster.admin.list_consumer_group_offsets(group, partitions=[tp]))[tp]
        offset: tuple[int, str] = (point.offset, point.metadata)
        if done(offset) or loop.time() >= deadline:
            return offset
        await asyncio.sleep(0.1)


async def look(reader: Any, tp: TopicPartition) -> tuple[Any, ...]:
    """What a reader reads now, then its position, high watermark and end offset."""
    records = [(offset, value) for _, offset, _, value in await drain(reader, tp)]
    ends = await reader.end_offsets([tp])
    return records, await reader.position(tp), reader.highwater(tp), ends[tp]


# -- 1. read_committed visibility -----------------------------------------------------------


async def visibility(cluster: Cluster) -> list[Any]:
    topic = await cluster.topic("visibility")
    tp = TopicPartition(topic, 0)
    producer = cluster.producer(cluster.name("txn"))
    committed = cluster.consumer(topic, read_committed=True)
    uncommitted = cluster.consumer(topic, read_committed=False)
    seen: list[Any] = []

    async def both(step: str) -> None:
        views = await asyncio.gather(look(committed, tp), look(uncommitted, tp))
        seen.append((step, *views))

    async with started(producer), started(committed), started(uncommitted):
        await producer.begin_transaction()
        await send(producer, topic, b"a")
        await send(producer, topic, b"b")
        await both("open")
        await producer.commit_transaction()
        await both("committed")
        await producer.begin_transaction()
        await send(producer, topic, b"c")
        await producer.abort_transaction()
        await both("aborted")
        await producer.begin_transaction()
        await send(producer, topic, b"d")
        await producer.commit_transaction()
        await both("committed again")
    return seen


async def test_read_committed_sees_committed_transactions_and_steps_over_markers(
    kafka: KafkaCluster,
) -> None:
    real, model = await on_both(kafka, visibility)
    assert real == model
    steps = {step: (committed, uncommitted) for step, committed, uncommitted in real}
    # (records, position, high watermark, end offset) of each reader.
    assert steps["open"] == (([], 0, 2, 0), ([(0, b"a"), (1, b"b")], 2, 2, 2))
    assert steps["committed"][0] == ([(0, b"a"), (1, b"b")], 3, 3, 3)  # marker at 2
    assert steps["aborted"] == (([], 5, 5, 5), ([(3, b"c")], 5, 5, 5))
    assert steps["committed again"][0] == ([(5, b"d")], 7, 7, 7)


# -- 2. offsets committed with the transaction ----------------------------------------------


async def transactional_offsets(cluster: Cluster) -> list[Any]:
    topic = await cluster.topic("offsets")
    tp = TopicPartition(topic, 0)
    group = cluster.name("group")
    producer = cluster.producer(cluster.name("txn"))
    seen: list[Any] = []

    def moved(point: tuple[int, str]) -> bool:
        return point[0] >= 0

    def now(point: tuple[int, str]) -> bool:
        return True

    async with started(producer):
        await producer.begin_transaction()
        await producer.send_offsets_to_transaction({tp: OffsetAndMetadata(5, "five")}, group)
        seen.append(("pending", await committed_offset(cluster, group, tp, now)))
        await producer.abort_transaction()
        seen.append(("aborted", await committed_offset(cluster, group, tp, moved)))
        await producer.begin_transaction()
        await producer.send_offsets_to_transaction({tp: OffsetAndMetadata(7, "seven")}, group)
        seen.append(("pending again", await committed_offset(cluster, group, tp, now)))
        await producer.commit_transaction()
        seen.append(("committed", await committed_offset(cluster, group, tp, moved)))
    return seen


async def test_offsets_sent_to_a_transaction_are_committed_with_it_only(
    kafka: KafkaCluster,
) -> None:
    real, model = await on_both(kafka, transactional_offsets)
    assert real == model
    # Never committed reads as offset -1 (not None).
    assert real == [
        ("pending", (-1, "")),
        ("aborted", (-1, "")),
        ("pending again", (-1, "")),
        ("committed", (7, "seven")),
    ]


# -- 3. KIP-447: fenced offset commits ------------------------------------------------------


async def commit_in_transaction(
    producer: Any, sink: str, tp: TopicPartition, offset: int, group: str
) -> tuple[str, ...]:
    """A record and an offset commit in one transaction: what each call answered."""
    await producer.begin_transaction()
    await send(producer, sink, str(offset).encode())
    offsets = await attempt(
        producer.send_offsets_to_transaction({tp: OffsetAndMetadata(offset, "")}, group)
    )
    commit = await attempt(producer.commit_transaction())
    if commit == "ok":
        return offsets, commit
    return offsets, commit, await attempt(producer.abort_transaction())


async def fenced_commits(cluster: Cluster) -> list[Any]:
    source = await cluster.topic("source", partitions=2)
    sink = await cluster.topic("sink")
    group = cluster.name("group")
    tp = TopicPartition(source, 0)
    producer = cluster.producer(cluster.name("txn"))

    def member_of(client_id: str) -> Any:
        return cluster.consumer(
            source,
            group_id=group,
            client_id=client_id,
            session_timeout_ms=SESSION_MS,
            heartbeat_interval_ms=HEARTBEAT_MS,
        )

    first = member_of("a")
    seen: list[Any] = []
    async with started(producer), started(first):
        stale = cluster.membership(first, group)
        seen.append(("joined", stale.generation_id, numbers(first.assignment())))
        seen.append(("current", await commit_in_transaction(producer, sink, tp, 5, stale)))
        second = member_of("b")
        async with started(second):

            async def first_rejoined() -> bool:
                await first.getmany(timeout_ms=100)
                return cluster.membership(first, group).generation_id > stale.generation_id

            await wait_until(first_rejoined, what="the first member to rejoin")
            current = cluster.membership(first, group)
            seen.append(("rejoined", current.generation_id, numbers(first.assignment())))
            seen.append(("stale", await commit_in_transaction(producer, sink, tp, 9, stale)))
            impostor = GroupGeneration(group, current.generation_id, "someone-else", None)
            seen.append(("impostor", await commit_in_transaction(producer, sink, tp, 8, impostor)))
            # No generation: a client before KIP-447, and no member of the group at all.
            seen.append(("plain", await commit_in_transaction(producer, sink, tp, 6, group)))
            seen.append(("current", await commit_in_transaction(producer, sink, tp, 7, current)))
    seen.append(("offset", (await committed_offset(cluster, group, tp, lambda p: p[0] == 7))[0]))
    async with started(cluster.consumer(sink)) as reader:
        seen.append(("sink", [value for _, _, _, value in await drain(reader)]))
    return seen


async def test_a_stale_generation_cannot_commit_and_no_generation_is_unchecked(
    kafka: KafkaCluster,
) -> None:
    real, model = await on_both(kafka, fenced_commits)
    assert real == model
    fenced = ("GroupFencedError: IllegalGenerationError",) * 2 + ("ok",)
    unknown = ("GroupFencedError: UnknownMemberIdError",) * 2 + ("ok",)
    assert real == [
        ("joined", 1, [0, 1]),
        ("current", ("ok", "ok")),
        ("rejoined", 2, [0]),
        ("stale", fenced),  # refused at send_offsets_to_transaction, again at the commit
        ("impostor", unknown),
        ("plain", ("ok", "ok")),
        ("current", ("ok", "ok")),
        ("offset", 7),
        ("sink", [b"5", b"6", b"7"]),  # the refused transactions were aborted
    ]


# -- 4. commit metadata size ----------------------------------------------------------------


async def metadata_sizes(cluster: Cluster) -> list[Any]:
    topic = await cluster.topic("metadata")
    tp = TopicPartition(topic, 0)
    group = cluster.name("group")
    producer = cluster.producer(cluster.name("txn"))
    reader = cluster.consumer(topic)
    seen: list[Any] = []

    async def commit(metadata: str) -> list[str]:
        await producer.begin_transaction()
        await send(producer, topic, f"{len(metadata)} characters".encode())
        point = {tp: OffsetAndMetadata(len(seen), metadata)}
        answers = [await attempt(producer.send_offsets_to_transaction(point, group))]
        answers.append(await attempt(producer.commit_transaction()))
        if answers[-1] != "ok":
            answers.append(await attempt(producer.abort_transaction()))
            answers.append(await attempt(producer.begin_transaction()))
        return answers

    async with started(producer), started(reader):
        seen.append(("4096 ASCII", await commit("m" * 4096)))
        # The limit counts Java chars (UTF-16 units), not bytes: 8192 bytes of UTF-8 pass...
        seen.append(("4096 two-byte", await commit("é" * 4096)))
        offset, metadata = await committed_offset(cluster, group, tp, lambda p: p[0] == 1)
        seen.append(("committed", offset, metadata == "é" * 4096))
        # ...and 2049 characters outside the BMP (4098 UTF-16 units) do not.
        seen.append(("4098 units", await commit("\U0001f600" * 2049)))
        # The transaction is left open (aiokafka's producer is dead): readers stop before it.
        seen.append(("read", await look(reader, tp)))
    return seen


async def test_commit_metadata_over_4096_chars_kills_the_producer(kafka: KafkaCluster) -> None:
    real, model = await on_both(kafka, metadata_sizes)
    assert real == model
    assert real[0] == ("4096 ASCII", ["ok", "ok"])
    # aiokafka's sender task dies of OffsetMetadataTooLargeError; the producer turns fatal.
    assert real[3] == (
        "4098 units",
        ["KafkaError", "AssertionError", "AssertionError", "AssertionError"],
    )


# -- 5. producer fencing --------------------------------------------------------------------


FIRST_CALLS: dict[str, Callable[[Any, str], Awaitable[Any]]] = {
    "send": lambda producer, topic: send(producer, topic, b"late"),
    "commit": lambda producer, topic: producer.commit_transaction(),
    "abort": lambda producer, topic: producer.abort_transaction(),
}


def producer_fencing(first_call: str) -> Callable[[Cluster], Coroutine[Any, Any, list[Any]]]:
    async def scenario(cluster: Cluster) -> list[Any]:
        topic = await cluster.topic("fencing")
        tp = TopicPartition(topic, 0)
        transactional_id = cluster.name("txn")
        old = cluster.producer(transactional_id)
        reader = cluster.consumer(topic)
        seen: list[Any] = []
        async with started(old), started(reader):
            await old.begin_transaction()
            await send(old, topic, b"old")
            async with started(cluster.producer(transactional_id)) as new:
                seen.append(("new started", await look(reader, tp)))
                seen.append((first_call, await attempt(FIRST_CALLS[first_call](old, topic))))
                later = [
                    await attempt(old.begin_transaction()),
                    await attempt(old.commit_transaction()),
                    await attempt(old.abort_transaction()),
                ]
                seen.append(("later calls fail", "ok" not in later))
                await new.begin_transaction()
                await send(new, topic, b"new")
                await new.commit_transaction()
                seen.append(("new committed", await look(reader, tp)))
        return seen

    return scenario


@pytest.mark.parametrize("first_call", sorted(FIRST_CALLS))
async def test_a_new_producer_aborts_and_fences_the_old_one(
    kafka: KafkaCluster, first_call: str
) -> None:
    real, model = await on_both(kafka, producer_fencing(first_call))
    assert real == model
    assert real == [
        ("new started", ([], 2, 2, 2)),  # the old transaction aborted: marker at 1
        (first_call, "ProducerFenced"),
        ("later calls fail", True),
        ("new committed", ([(2, b"new")], 4, 4, 4)),
    ]


# -- 6. transaction timeout -----------------------------------------------------------------


async def transaction_timeouts(cluster: Cluster) -> list[Any]:
    """Two transactions, the second begun 3 s after the first, both with a timeout of 1 s:
    each is aborted at a sweep of the broker, so they end together or a sweep apart."""
    topic = await cluster.topic("timeout", partitions=2)
    reader = cluster.consumer(topic)
    producers = [cluster.producer(cluster.name("txn"), transaction_timeout_ms=1000) for _ in "xy"]
    loop = asyncio.get_running_loop()
    began: list[float] = []
    sent: list[float] = []  # the broker starts the clock in between, at the first send
    aborted: dict[int, float] = {}
    seen: list[Any] = []

    async def aborts() -> bool:
        await reader.getmany(timeout_ms=100)
        for partition in range(len(began)):
            position = await reader.position(TopicPartition(topic, partition))
            if position > 0:
                aborted.setdefault(partition, loop.time())
        return len(aborted) == 2

    async with started(reader), started(producers[0]), started(producers[1]):
        for partition, producer in enumerate(producers):
            if partition:
                await asyncio.sleep(3.0)
            began.append(loop.time())
            await producer.begin_transaction()
            await send(producer, topic, b"too slow", partition=partition)
            sent.append(loop.time())
        await wait_until(
            aborts, what="the broker to abort both transactions", timeout_s=3 * TXN_SWEEP_S
        )
        for partition, producer in enumerate(producers):
            # Past the timeout, by at most a sweep (and the reader's fetch, under a second).
            late = aborted[partition] - sent[partition] <= 1.0 + TXN_SWEEP_S + 1.0
            seen.append(("aborted after the timeout", aborted[partition] - began[partition] > 1.0))
            seen.append(("within a sweep", late))
            seen.append(("commit", await attempt(producer.commit_transaction())))
        apart = aborted[1] - aborted[0]
        # Begun 3 s apart, aborted 0 or one sweep apart: 2 s of slack for the reader's
        # fetches on a loaded machine still tells the two apart.
        seen.append(("at sweeps", min(abs(apart), abs(apart - TXN_SWEEP_S)) < 2.0))
        seen.append(("read", await drain(reader)))
    return seen


async def test_the_broker_aborts_a_transaction_past_its_timeout_and_fences_it(
    kafka: KafkaCluster,
) -> None:
    real, model = await on_both(kafka, transaction_timeouts)
    assert real == model
    assert real == [
        ("aborted after the timeout", True),
        ("within a sweep", True),
        ("commit", "ProducerFenced"),
        ("aborted after the timeout", True),
        ("within a sweep", True),
        ("commit", "ProducerFenced"),
        ("at sweeps", True),
        ("read", []),
    ]


# -- 7. consumer groups ---------------------------------------------------------------------


def member(
    cluster: Cluster,
    name: str,
    topic: str,
    group: str,
    events: list[Event],
    times: dict[Event, float],
    *,
    revoke_s: float = 0.0,
    **settings: Any,
) -> Any:
    consumer = cluster.consumer(
        group_id=group,
        client_id=name,  # member ids start with it: a's sort before b's
        session_timeout_ms=SESSION_MS,
        heartbeat_interval_ms=HEARTBEAT_MS,
        **settings,
    )

    def who() -> GroupGeneration:
        return cluster.membership(consumer, group)

    consumer.subscribe([topic], listener=Recorder(name, who, events, times, revoke_s))
    return consumer


class Poller:
    """Polls a consumer as the relay's intake does, and notes when the first poll begun
    during a rebalance (between a revocation and the next assignment) came back."""

    def __init__(self, consumer: Any, name: str, events: list[Event], *, note: bool) -> None:
        self.consumer = consumer
        self.stopped = False
        self.idle_s = 0.0
        self._name = name
        self._events = events
        # Only where a rebalance lasts (a slow revocation, a member that left): a quick one
        # may fall between two polls or not, at random.
        self._note = note

    def _rebalancing(self) -> bool:
        mine = [
            e.what
            for e in self._events
            if e.member == self._name and e.what in ("revoked", "revoke done", "assigned")
        ]
        return bool(mine) and mine[-1] != "assigned"

    async def run(self) -> None:
        noted = not self._note
        while not self.stopped:
            if self.idle_s:
                self._events.append(Event(self._name, "stops polling"))
                await asyncio.sleep(self.idle_s)
                self.idle_s = 0.0
                self._events.append(Event(self._name, "polls again"))
            rebalancing = self._rebalancing()
            await self.consumer.getmany(timeout_ms=100)
            if rebalancing and not noted:
                noted = True
                self._events.append(Event(self._name, "poll begun in a rebalance returned"))


async def has(events: list[Event], wanted: Event) -> bool:
    return wanted in events


async def joining(cluster: Cluster) -> list[Any]:
    """a alone, then b joins (a's revocation takes 2 s), then b leaves."""
    topic = await cluster.topic("group", partitions=5)
    group = cluster.name("group")
    events: list[Event] = []
    times: dict[Event, float] = {}
    seen: list[Any] = []
    a = member(cluster, "a", topic, group, events, times, revoke_s=2.0)
    async with started(a):
        seen.append(("a started with", numbers(a.assignment())))
        polling = Poller(a, "a", events, note=True)
        poller = asyncio.create_task(polling.run())
        b = member(cluster, "b", topic, group, events, times)
        async with started(b):
            seen.append(("b started with", numbers(b.assignment())))
            await wait_until(
                lambda: has(events, Event("a", "assigned", (0, 2, 4), 2, True)), what="a"
            )
        await wait_until(
            lambda: has(events, Event("a", "assigned", (0, 1, 2, 3, 4), 3, True)), what="a"
        )
        polling.stopped = True
        await poller
    seen.append(("a", of(events, "a")))
    seen.append(("b", of(events, "b")))
    # b's join completed only once a had revoked everything and rejoined.
    revoked = times[Event("a", "revoked", (0, 1, 2, 3, 4), 1, True)]
    seen.append(
        ("a revoked before b got", revoked < times[Event("b", "assigned", (1, 3), 2, True)])
    )
    return seen


async def test_a_join_makes_every_member_revoke_everything_then_assigns_round_robin(
    kafka: KafkaCluster,
) -> None:
    real, model = await on_both(kafka, joining)
    assert real == model
    assert real[0:2] == [("a started with", [0, 1, 2, 3, 4]), ("b started with", [1, 3])]
    assert real[2] == (
        "a",
        [
            Event("a", "revoked", (), -1, False),  # before its first join
            Event("a", "assigned", (0, 1, 2, 3, 4), 1, True),
            Event("a", "revoked", (0, 1, 2, 3, 4), 1, True),
            Event("a", "revoke done"),
            Event("a", "assigned", (0, 2, 4), 2, True),  # round robin, a's id sorts first
            Event("a", "poll begun in a rebalance returned"),  # getmany waited
            Event("a", "revoked", (0, 2, 4), 2, True),  # b left
            Event("a", "revoke done"),
            Event("a", "assigned", (0, 1, 2, 3, 4), 3, True),
        ],
    )
    # b's start returned with its partitions; its stop called no revoke callback.
    assert real[3] == (
        "b",
        [Event("b", "revoked", (), -1, False), Event("b", "assigned", (1, 3), 2, True)],
    )


async def eviction(cluster: Cluster) -> list[Any]:
    """a stops dead for 8 s (past its 6 s session), then goes on."""
    topic = await cluster.topic("group", partitions=4)
    group = cluster.name("group")
    events: list[Event] = []
    times: dict[Event, float] = {}
    seen: list[Any] = []
    stopped = [False]  # read by a's thread

    async def run_a() -> None:
        a = member(cluster, "a", topic, group, events, times)
        async with started(a):
            while not stopped[0]:
                await a.getmany(timeout_ms=100)

    frozen_a = cluster.spawn("a", run_a)
    await wait_until(lambda: has(events, Event("a", "assigned", (0, 1, 2, 3), 1, True)), what="a")
    b = member(cluster, "b", topic, group, events, times)
    async with started(b):
        polling = Poller(b, "b", events, note=False)
        poller = asyncio.create_task(polling.run())
        await wait_until(
            lambda: has(events, Event("a", "assigned", (0, 2), 2, True)), what="a rejoined"
        )
        froze = asyncio.get_running_loop().time()
        frozen_a.freeze(8.0)
        took_all = Event("b", "assigned", (0, 1, 2, 3), 3, True)
        await wait_until(
            lambda: has(events, took_all), what="b to take a's partitions", timeout_s=20.0
        )
        evicted = times[took_all] - froze
        in_window = SESSION_MS / 1000 - HEARTBEAT_MS / 1000 <= evicted <= SESSION_MS / 1000 + 1.5
        seen.append(("evicted after the session timeout", in_window))
        await wait_until(
            lambda: has(events, Event("a", "assigned", (0, 2), 4, True)),
            what="a back",
            timeout_s=20,
        )
        await wait_until(
            lambda: has(events, Event("b", "assigned", (1, 3), 4, True)), what="b", timeout_s=20
        )
        polling.stopped = True
        stopped[0] = True
        await poller
    await frozen_a.result()
    seen.append(("a", of(events, "a")))
    seen.append(("b", of(events, "b")))
    return seen


async def test_a_member_silent_past_its_session_is_evicted_and_rejoins(
    kafka: KafkaCluster,
) -> None:
    real, model = await on_both(kafka, eviction)
    assert real == model
    assert real[0] == ("evicted after the session timeout", True)
    assert real[1][1][-3:] == [
        Event("a", "assigned", (0, 2), 2, True),
        # It learns at its next heartbeat; aiokafka forgets the generation before revoking.
        Event("a", "revoked", (0, 2), -1, False),
        Event("a", "assigned", (0, 2), 4, True),
    ]


async def laggard(cluster: Cluster) -> list[Any]:
    """a's revocation takes 4 s: past the rebalance timeout (2 s), within its session."""
    topic = await cluster.topic("group", partitions=4)
    group = cluster.name("group")
    events: list[Event] = []
    times: dict[Event, float] = {}
    a = member(cluster, "a", topic, group, events, times, revoke_s=4.0, rebalance_timeout_ms=2000)
    b = member(cluster, "b", topic, group, events, times, rebalance_timeout_ms=2000)
    async with started(a):
        polling = Poller(a, "a", events, note=True)
        poller = asyncio.create_task(polling.run())
        async with started(b):
            b_polling = Poller(b, "b", events, note=False)
            b_poller = asyncio.create_task(b_polling.run())
            await wait_until(
                lambda: has(events, Event("b", "assigned", (1, 3), 3, True)), what="b", timeout_s=20
            )
            await wait_until(
                lambda: has(events, Event("a", "assigned", (0, 2), 3, True)), what="a", timeout_s=20
            )
            polling.stopped = b_polling.stopped = True
            await asyncio.gather(poller, b_poller)
    return [("a", of(events, "a")), ("b", of(events, "b"))]


async def test_a_member_that_does_not_rejoin_within_the_rebalance_timeout_is_dropped(
    kafka: KafkaCluster,
) -> None:
    real, model = await on_both(kafka, laggard)
    assert real == model
    assert real[1] == (
        "b",
        [
            Event("b", "revoked", (), -1, False),
            Event("b", "assigned", (0, 1, 2, 3), 2, True),  # without a
            Event("b", "revoked", (0, 1, 2, 3), 2, True),  # a came back
            Event("b", "assigned", (1, 3), 3, True),
        ],
    )


async def slow_revocation(cluster: Cluster) -> list[Any]:
    """a's revocation takes 8 s: past its session (6 s), within the rebalance timeout."""
    topic = await cluster.topic("group", partitions=4)
    group = cluster.name("group")
    events: list[Event] = []
    times: dict[Event, float] = {}
    a = member(cluster, "a", topic, group, events, times, revoke_s=8.0, rebalance_timeout_ms=12_000)
    b = member(cluster, "b", topic, group, events, times, rebalance_timeout_ms=12_000)
    async with started(a), started(b):
        await wait_until(
            lambda: has(events, Event("a", "assigned", (0, 2), 2, True)), what="a", timeout_s=20
        )
    return [("a", of(events, "a")), ("b", of(events, "b"))]


async def test_a_member_keeps_its_session_while_it_revokes(kafka: KafkaCluster) -> None:
    real, model = await on_both(kafka, slow_revocation)
    assert real == model
    assert real[0][1][-3:] == [
        Event("a", "revoked", (0, 1, 2, 3), 1, True),
        Event("a", "revoke done"),
        Event("a", "assigned", (0, 2), 2, True),  # still a member: no generation between
    ]


async def poll_timeout(cluster: Cluster) -> list[Any]:
    """a alone stops polling for 2.5 s with a max poll interval of 1 s."""
    topic = await cluster.topic("group", partitions=2)
    group = cluster.name("group")
    events: list[Event] = []
    times: dict[Event, float] = {}
    a = member(cluster, "a", topic, group, events, times, max_poll_interval_ms=1000)
    async with started(a):
        polling = Poller(a, "a", events, note=True)
        poller = asyncio.create_task(polling.run())
        await asyncio.sleep(0.5)
        polling.idle_s = 2.5
        await wait_until(
            lambda: has(events, Event("a", "polls again")), what="a to poll again", timeout_s=10
        )
        await wait_until(
            lambda: has(events, Event("a", "assigned", (0, 1), 3, True)), what="a", timeout_s=10
        )
        polling.stopped = True
        await poller
    return of(events, "a")


async def test_a_member_that_stops_polling_leaves_and_revokes_at_once(
    kafka: KafkaCluster,
) -> None:
    real, model = await on_both(kafka, poll_timeout)
    assert real == model
    assert real == [
        Event("a", "revoked", (), -1, False),
        Event("a", "assigned", (0, 1), 1, True),
        Event("a", "stops polling"),
        # At the poll timeout, not at the next poll: it left, its generation forgotten.
        Event("a", "revoked", (0, 1), -1, False),
        Event("a", "polls again"),
        # The group became empty when it left (generation 2), it joins generation 3.
        Event("a", "assigned", (0, 1), 3, True),
        Event("a", "poll begun in a rebalance returned"),  # the poll waited for the join
    ]


# -- 8. the partitioner ---------------------------------------------------------------------


async def partitioning(cluster: Cluster) -> list[tuple[bytes, int]]:
    topic = await cluster.topic("keys", partitions=5)
    producer = cluster.producer(cluster.name("txn"))
    async with started(producer):
        await producer.begin_transaction()
        for number in range(30):
            await send(producer, topic, b"value", key=f"key-{number}".encode())
        await producer.commit_transaction()
    async with started(cluster.consumer(topic)) as reader:
        return sorted((key, partition) for partition, _, key, _ in await drain(reader))


async def test_a_keyed_record_lands_on_the_murmur2_partition_of_its_key(
    kafka: KafkaCluster,
) -> None:
    real, model = await on_both(kafka, partitioning)
    assert real == model
    assert len(real) == 30
    assert all(partition == (murmur2(key) & 0x7FFFFFFF) % 5 for key, partition in real)


# -- 9. compaction --------------------------------------------------------------------------


async def compaction(cluster: Cluster) -> list[Any]:
    topic = await cluster.topic("ledger", compacted=True)
    tp = TopicPartition(topic, 0)
    producer = cluster.producer(cluster.name("txn"))
    seen: list[Any] = []
    async with started(producer):
        writes: list[tuple[list[tuple[bytes, bytes | None]], bool]] = [
            ([(b"a", b"a1"), (b"b", b"b1")], True),
            ([(b"x", b"aborted")], False),
            ([(b"a", None), (b"b", b"b2")], True),
        ]
        for pairs, commit in writes:
            await producer.begin_transaction()
            for key, value in pairs:
                await send(producer, topic, value, key=key)
            await (producer.commit_transaction() if commit else producer.abort_transaction())
        # The broker never cleans the segment being written: roll it (segment.ms is 200).
        await asyncio.sleep(0.5)
        await producer.begin_transaction()
        await send(producer, topic, b"roll", key=b"roller")
        await producer.commit_transaction()
    await cluster.compaction(topic, records=6)
    for read_committed in (False, True):
        async with started(cluster.consumer(topic, read_committed=read_committed)) as reader:
            records = [(offset, key, value) for _, offset, key, value in await drain(reader)]
            seen.append((read_committed, records, await reader.position(tp)))
    return seen


async def test_compaction_keeps_the_last_record_of_each_key_and_drops_aborted_ones(
    kafka: KafkaCluster,
) -> None:
    real, model = await on_both(kafka, compaction)
    assert real == model
    kept = [(5, b"a", None), (6, b"b", b"b2"), (8, b"roller", b"roll")]  # the tombstone too
    assert real == [(False, kept, 10), (True, kept, 10)]
