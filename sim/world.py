"""One simulated history: a seed draws the workload, the relay's settings, the replicas
and the faults; the real stages run against the in-memory Kafka and API on the
virtual loop; the oracle judges what the world shows at the end.

Faults drawn from the seed, each at a random moment or at a random step of a replica
(so at any await): a replica killed (its memory gone, as SIGKILL: none of its code
runs again; Kafka keeps what it committed and its open transaction until the
transaction timeout) and started again as a new process; a replica paused (SIGSTOP:
the clock runs on for everyone else) and resumed; replicas joining and leaving (a
graceful stop); wall clocks of hosts drifting apart; a compaction of the ledger; the
API losing answers, failing before or after creating a task, answering after the
client's timeout, throttling.
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import random
import traceback
import uuid
from collections.abc import Callable, Mapping, MutableMapping
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any, Final

import structlog
from prometheus_client import CollectorRegistry

from service.app import REBALANCE_MARGIN_S
from service.core import batching
from service.fencing import GroupGeneration
from service.metrics import RelayMetrics
from service.relay.config import WALL_CLOCK, RelayConfig
from service.relay.supervisor import Relay
from sim.api import EPOCH, ApiFaults, SimApiClient, VendorApi
from sim.kafka import Broker, SimAdmin, SimConsumer, SimProducer
from sim.oracle import Verdict, judge
from sim.vloop import REPLICA, SimulationStalledError, VirtualLoop
from sim.workload import Workload, generate
from tests.settings_support import relay_config

INPUT, RESULTS, DLQ, TASKS = "scm.changes", "scm.results", "scm.dlq", "scm.tasks"
GROUP: Final = "scm-relay"
SETTLE_LIMIT_S: Final = 900.0  # virtual seconds for a history to settle after its last fault
FENCED_RESTART_S: Final = 1.0


@dataclass
class Scenario:
    """Everything drawn from one seed."""

    seed: int
    partitions: int
    replicas: int
    config: RelayConfig
    api_faults: ApiFaults
    faults: list[tuple[float, str, int]]  # (virtual time, kind, replica index)
    drift: dict[int, tuple[float, float]]  # host -> (offset s, rate) of its wall clock
    fetch_records: int
    compact_at: list[float]
    backlog: bool


def draw(seed: int) -> Scenario:
    rng = random.Random(seed)
    backlog = rng.random() < 0.12
    partitions = rng.randint(1, 6) if not backlog else rng.randint(1, 2)
    replicas = rng.randint(1, 3)
    request_timeout = rng.choice([2.0, 5.0, 10.0])
    config = relay_config(
        input_topic=INPUT,
        results_topic=RESULTS,
        dlq_topic=DLQ,
        tasks_topic=TASKS,
        group_id=GROUP,
        batch_max_values=rng.choice([5, 10, 20, 50, 100]),
        batch_linger_s=rng.choice([0.05, 0.2, 1.0]),
        max_in_flight_requests=rng.randint(1, 4),
        max_open_batches=rng.choice([4, 50, 1000]),
        rebalance_timeout_s=rng.choice([5.0, 20.0]),
        poll_initial_s=0.5,
        poll_factor=1.5,
        poll_max_s=5.0,
        retry_initial_s=0.1,
        retry_max_backoff_s=2.0,
        reconcile_after_s=request_timeout,
        intent_send_window_s=rng.choice([2.0, 10.0]),
        intent_clock_margin_s=5.0,
    )
    faulty = rng.random() < 0.8 or backlog
    api_faults = ApiFaults(
        lost_after_create=rng.choice([0.0, 0.02, 0.1]) if faulty else 0.0,
        error_after_create=rng.choice([0.0, 0.02, 0.05]) if faulty else 0.0,
        error_before_create=rng.choice([0.0, 0.02]) if faulty else 0.0,
        timeout_before_create=rng.choice([0.0, 0.02]) if faulty else 0.0,
        slow_after_create=rng.choice([0.0, 0.02]) if faulty else 0.0,
        read_unavailable=rng.choice([0.0, 0.05]) if faulty else 0.0,
        list_lag_s=rng.choice([0.0, 1.0, 3.0]),
    )
    kinds = ["kill", "kill", "pause", "join", "leave"]
    faults = []
    for _ in range(rng.choice([0, 1, 1, 2, 3])):
        faults.append((rng.uniform(0.5, 40.0), rng.choice(kinds), rng.randrange(replicas)))
    if backlog:  # a replica killed while the backlog drains
        faults.append((rng.uniform(2.0, 15.0), "kill", rng.randrange(replicas)))
    faults.sort()
    hosts = replicas + sum(1 for _, kind, _ in faults if kind == "join")
    drift = {
        host: (rng.uniform(-1.0, 1.0) if rng.random() < 0.3 else 0.0, rng.uniform(-1e-4, 1e-4))
        for host in range(hosts)
    }
    return Scenario(
        seed=seed,
        partitions=partitions,
        replicas=replicas,
        config=config,
        api_faults=api_faults,
        faults=faults,
        drift=drift,
        fetch_records=rng.choice([1, 10, 500]),
        compact_at=[rng.uniform(1.0, 60.0)] if rng.random() < 0.3 else [],
        backlog=backlog,
    )


class _Membership:
    """A consumer's group membership, as the committer's fencing asks for it."""

    def __init__(self, consumer: SimConsumer, group_id: str) -> None:
        self._consumer = consumer
        self._group_id = group_id

    def group(self) -> str:
        consumer = self._consumer
        return GroupGeneration(self._group_id, consumer.generation, consumer.member_id, None)


@dataclass
class Replica:
    """One relay process on one host."""

    name: str
    host: int
    stop: asyncio.Event
    task: asyncio.Task[None] | None = None
    consumers: list[SimConsumer] = field(default_factory=list)


class World:
    """The broker, the API, the replicas and the history of one seed."""

    def __init__(self, scenario: Scenario, workload: Workload) -> None:
        self.scenario = scenario
        self.workload = workload
        self.loop = VirtualLoop()
        self.loop.set_exception_handler(self._loop_exception)
        self.rng = random.Random(scenario.seed * 7919 + 1)
        self.broker = Broker(self.loop, random.Random(scenario.seed + 17))
        self.vendor = VendorApi(
            self.loop,
            random.Random(scenario.seed + 29),
            workload.codes,
            scenario.api_faults,
        )
        self.replicas: list[Replica] = []
        self.history: list[str] = []
        self.published: list[tuple[Any, int]] = []
        self.errors: list[str] = []
        self.verbose = False
        self._pids = itertools.count(100)
        self._ctx = contextvars.copy_context()  # the harness's: no replica

    # -- the readable history -----------------------------------------------------------

    def note(self, who: str, what: str) -> None:
        self.history.append(f"{self.loop.time():9.3f} {who}: {what}")

    def _loop_exception(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        message = str(context.get("message", ""))
        if "was destroyed but it is pending" in message:
            return  # a killed replica's tasks
        exception = context.get("exception")
        self.errors.append(f"{message}: {exception!r}")
        self.note("loop", f"unhandled: {message} {exception!r}")

    def wall_clock(self, host: int) -> Callable[[], float]:
        offset, rate = self.scenario.drift.get(host, (0.0, 0.0))
        start = EPOCH.timestamp()
        loop = self.loop
        return lambda: start + offset + loop.time() * (1.0 + rate)

    # -- replicas -----------------------------------------------------------------------

    def start_replica(self, host: int) -> Replica:
        name = f"r{host}#{next(self._pids)}"
        replica = Replica(name, host, asyncio.Event())
        context = contextvars.copy_context()
        context.run(REPLICA.set, name)
        context.run(WALL_CLOCK.set, self.wall_clock(host))
        replica.task = self.loop.create_task(self._run_replica(replica), context=context)
        self.replicas.append(replica)
        self.note(name, "started")
        return replica

    async def _run_replica(self, replica: Replica) -> None:
        """What `scm-relay run` does: incarnations until stopped; a fenced incarnation is
        torn down and a fresh one rejoins (service/app.py `_run_incarnations`)."""
        from service.relay.committer import ReplicaFencedError

        incarnation = 0
        while not replica.stop.is_set():
            incarnation += 1
            try:
                async with AsyncExitStack() as stack:
                    relay = await self._build(replica, stack, incarnation)
                    await relay.run(replica.stop)
                    return
            except BaseExceptionGroup as group:
                if group.subgroup(ReplicaFencedError) is None:
                    trace = "".join(traceback.format_exception(group))[-3000:]
                    self.errors.append(f"{replica.name} crashed: {group!r}\n{trace}")
                    self.note(replica.name, f"crashed: {group!r}")
                    return
            self.note(replica.name, "fenced: a fresh incarnation rejoins")
            await asyncio.sleep(FENCED_RESTART_S)

    async def _build(self, replica: Replica, stack: AsyncExitStack, incarnation: int) -> Relay:
        config = self.scenario.config
        client_id = f"{replica.name}.{incarnation}"
        producer = SimProducer(self.broker, f"{GROUP}-host{replica.host}-{replica.name}")
        await producer.start()
        # As service/app.py builds them: the group waits for a member's revoke callback.
        rebalance_timeout_s = config.batching.rebalance_timeout_s + REBALANCE_MARGIN_S
        consumer = SimConsumer(
            self.broker,
            client_id=f"{client_id}-in",
            group_id=GROUP,
            fetch_records=self.scenario.fetch_records,
            rebalance_timeout_s=rebalance_timeout_s,
        )
        ledger_reader = SimConsumer(self.broker, client_id=f"{client_id}-ledger", topics=[TASKS])
        poller_member = SimConsumer(
            self.broker,
            client_id=f"{client_id}-poller",
            group_id=f"{GROUP}.task-poller",
            read_committed=False,
            rebalance_timeout_s=rebalance_timeout_s,
        )
        relay = Relay(
            config,
            consumer=consumer,
            producer=producer,
            ledger_reader=ledger_reader,
            poller_member=poller_member,
            admin=SimAdmin(self.broker),
            client=SimApiClient(
                self.vendor,
                random.Random(self.rng.getrandbits(64)),
                WALL_CLOCK.get(),
                config.reconcile_after_s,
            ),
            metrics=RelayMetrics(CollectorRegistry()),
            clock=self.loop.time,
            membership=_Membership(consumer, GROUP),
            result_membership=_Membership(poller_member, f"{GROUP}.task-poller"),
            rng=random.Random(self.rng.getrandbits(64)),
        )
        consumer.subscribe([INPUT], listener=relay.rebalance_listener())
        for kafka_consumer in (ledger_reader, poller_member, consumer):
            await kafka_consumer.start()
            stack.push_async_callback(kafka_consumer.stop)
        replica.consumers = [consumer, poller_member]
        return relay

    # -- faults -------------------------------------------------------------------------

    def _live(self) -> list[Replica]:
        return [r for r in self.replicas if r.name not in self.loop.killed and not r.stop.is_set()]

    async def _faults(self) -> None:
        joined = self.scenario.replicas
        for at, kind, index in self.scenario.faults:
            await asyncio.sleep(max(0.0, at - self.loop.time()))
            live = self._live()
            if kind == "join":
                self.start_replica(joined)
                joined += 1
                continue
            if not live:
                continue
            replica = live[index % len(live)]
            if kind == "kill":
                # At a random step of its own: anywhere between two awaits.
                step = self.loop.steps[replica.name] + self.rng.randint(1, 400)
                self.loop.at_step[(replica.name, step)] = self._killer(replica)
            elif kind == "pause":
                length = self.rng.choice([2.0, 12.0, 30.0, 90.0])
                self.loop.pause(replica.name)
                self.note(replica.name, f"paused for {length:.0f} s")
                self.loop.call_later(length, self._resumer(replica))
            elif kind == "leave" and len(live) > 1:
                self.note(replica.name, "asked to stop (leaves the group)")
                replica.stop.set()

    def _killer(self, replica: Replica) -> Callable[[], None]:
        def kill() -> None:
            self.loop.kill(replica.name)
            self.note(replica.name, "killed (SIGKILL)")
            # Runs inside the killed replica's step: the restart belongs to the harness.
            self.loop.call_soon(self._restart(replica), context=self._ctx)

        return kill

    def _restart(self, replica: Replica) -> Callable[[], None]:
        def restart() -> None:
            self.start_replica(replica.host)

        return restart

    def _resumer(self, replica: Replica) -> Callable[[], None]:
        def resume() -> None:
            if replica.name in self.loop.paused:
                self.loop.resume(replica.name)
                self.note(replica.name, "resumed")

        return resume

    # -- the run ------------------------------------------------------------------------

    async def _publish(self) -> None:
        for record in self.workload.records:
            await asyncio.sleep(max(0.0, record.at - self.loop.time()))
            offset = self.broker.append(_tp(INPUT, record.partition), record.key, record.value)
            self.published.append((record, offset))

    async def _compactions(self) -> None:
        for at in self.scenario.compact_at:
            await asyncio.sleep(max(0.0, at - self.loop.time()))
            self.broker.compact(TASKS)
            self.note("broker", "compacted the ledger")

    def settled(self) -> bool:
        if len(self.published) < len(self.workload.records):
            return False
        committed = self.broker.group(GROUP).committed
        for tp in self.broker.partitions_for(INPUT):
            point = committed.get(tp)
            if point is None or point[0] < self.broker.partition(tp).high_watermark:
                return False
        if any(t.state != "complete" for t in self.vendor.tasks.values()):
            return False
        outcomes = {
            (r.key or b"").decode()
            for r in self.broker.committed_records[RESULTS]
            if r.value is not None and b'"codes_affected"' in r.value
        }
        return all(task_id in outcomes for task_id in self.vendor.tasks)

    async def _main(self) -> None:
        for topic, partitions, compacted in (
            (INPUT, self.scenario.partitions, False),
            (RESULTS, self.scenario.partitions, False),
            (DLQ, 1, False),
            (TASKS, self.scenario.partitions, True),
        ):
            self.broker.create_topic(topic, partitions, compacted=compacted)
        self.broker.start()
        for host in range(self.scenario.replicas):
            self.start_replica(host)
        background = [
            self.loop.create_task(work)
            for work in (self._publish(), self._faults(), self._compactions())
        ]
        # Faults end (the API heals) a minute after the last scheduled one; from then on the
        # relay must converge within SETTLE_LIMIT_S, or the oracle says it did not.
        quiet_from = 60.0 + max(
            [0.0, *(at for at, _, _ in self.scenario.faults), *self.scenario.compact_at]
        )
        healed = False
        while self.loop.time() < quiet_from + SETTLE_LIMIT_S:
            await asyncio.sleep(1.0)
            if not healed and self.loop.time() >= quiet_from:
                healed = True
                self.vendor.heal()
                self.note("api", "faults end")
            if self.errors or (healed and self.settled()):
                break
        for task in background:
            task.cancel()

    def run(self) -> Verdict:
        seeded = random.Random(self.scenario.seed + 41)
        # Batch ids are a uuid and a counter per process: both restart with the seed.
        vars(batching)["_NEXT_BATCH"] = itertools.count(1)
        real_uuid4 = uuid.uuid4
        uuid.uuid4 = lambda: uuid.UUID(int=seeded.getrandbits(128), version=4)
        try:
            self.loop.run_until_complete(self._main())
        except SimulationStalledError as stalled:
            # Every task waits on something no timer or task will ever set: a deadlock.
            self.errors.append(f"deadlock: {stalled}")
        except RuntimeError:
            if self.loop.stalled is None:
                raise
            self.errors.append(self.loop.stalled)
        finally:
            uuid.uuid4 = real_uuid4
        return self.verdict()

    def describe(self) -> str:
        s = self.scenario
        return (
            f"{s.partitions} partitions, {s.replicas} replicas, {len(self.workload.records)} "
            f"records, batches of {s.config.batching.batch_max_values}, faults "
            + (", ".join(f"{kind} r{index} at {at:.1f}s" for at, kind, index in s.faults) or "none")
            + f"; ended at {self.loop.time():.0f} s virtual"
        )

    def readable_history(self) -> str:
        """Per replica what it read, sent and committed, and when; the broker's and the
        API's decisions; merged in time order."""
        lines = [*self.history]
        lines += [f"{'':9} broker: {line}" for line in self.broker.log]
        lines += [line.replace(" api:", " api:", 1) for line in self.vendor.log]
        return "\n".join(lines)

    def shutdown(self) -> None:
        """End every task (the killed ones too, whose cleanup no longer matters), so
        that nothing runs once the loop is closed."""
        loop = self.loop
        loop.wind_down()
        for _ in range(10):  # cancelled tasks may start others (a consumer's stop)
            pending = [task for task in asyncio.all_tasks(loop) if not task.done()]
            if not pending:
                break
            for task in pending:
                task.cancel()
            loop.run_until_complete(asyncio.wait(pending, timeout=120.0))
        loop.close()

    def verdict(self) -> Verdict:
        committed = self.broker.group(GROUP).committed
        verdict = judge(
            self.published,
            self.vendor.applied,
            list(self.vendor.tasks),
            {
                "dlq": self.broker.committed_records[DLQ],
                "tasks": self.broker.committed_records[TASKS],
                "results": self.broker.committed_records[RESULTS],
            },
            {"dlq": DLQ, "tasks": TASKS, "results": RESULTS},
            {tp.partition: point[0] for tp, point in committed.items() if tp.topic == INPUT},
            {
                tp.partition: self.broker.partition(tp).high_watermark
                for tp in self.broker.partitions_for(INPUT)
            },
        )
        for error in self.errors:
            verdict.add("crash", error)
        return verdict


def _tp(topic: str, partition: int) -> Any:
    from aiokafka import TopicPartition

    return TopicPartition(topic, partition)


def simulate(seed: int) -> tuple[Verdict, World]:
    """Run the history of `seed`."""
    scenario = draw(seed)
    workload = generate(
        random.Random(seed + 3),
        partitions=scenario.partitions,
        batch_max_values=scenario.config.batching.batch_max_values,
        backlog=scenario.backlog,
    )
    world = World(scenario, workload)
    _capture_logs(world)
    try:
        verdict = world.run()
    finally:
        world.shutdown()
    return verdict, world


# The relay's log events kept in the readable history (the rest are dropped: they cost
# time and say little about what the relay did to Kafka and the API).
KEPT_EVENTS: Final = frozenset(
    {
        "partitions_assigned",
        "partitions_revoked",
        "batch_submitted",
        "batch_ambiguous",
        "batch_reconciled",
        "batch_created_several_tasks",
        "reconcile_skipped_recorded_tasks",
        "reconcile_lookup_unfinished",
        "batch_rejected",
        "batch_revoked_before_sending",
        "intent_orphaned",
        "intent_resolved",
        "intent_expired_before_sending",
        "batch_abandoned",
        "progress_record_not_the_committed_one",
        "clock_jump",
        "relay_fenced",
        "rebalance_deadline_uploads_in_flight",
        "transaction_failed",
        "partition_stopped_undecodable",
        "relay_stopping",
        "event_invalid",
        "intake_paused",
        "intake_resumed",
    }
)


def _capture_logs(world: World) -> None:
    def keep(_logger: Any, _method: str, event: MutableMapping[str, Any]) -> Mapping[str, Any]:
        name = event.pop("event", "")
        if name in KEPT_EVENTS or world.verbose:
            fields = " ".join(f"{k}={v}" for k, v in event.items() if k not in ("hint",))
            world.note(REPLICA.get() or "-", f"{name} {fields}"[:400])
        raise structlog.DropEvent

    structlog.configure(
        processors=[keep],
        logger_factory=structlog.ReturnLoggerFactory(),
        cache_logger_on_first_use=False,
    )
