"""The composition root: settings in, every client built and entered in one exit stack.

Only this module (and the CLI that calls it) builds Kafka clients, the HTTP
session and the logger configuration. Signal handlers only set an event;
shutdown then runs in a fixed order inside `Relay.run`. Each part takes its
section of the settings whole (service/settings.py).
"""

from __future__ import annotations

import asyncio
import gc
import random
import signal
import weakref
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import AsyncExitStack, suppress
from dataclasses import replace
from typing import Any, Final

import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError
from prometheus_client import CollectorRegistry

from service import fencing, txn_backoff
from service.core.resilience import Backoff
from service.http import build_http_app, serving
from service.kafka import (
    DEAD_LETTER_OVERHEAD_BYTES,
    PRODUCER_MAX_REQUEST_BYTES,
    RECORD_OVERHEAD_BYTES,
    DecodingConsumer,
    KafkaSetupError,
    KafkaUnreachableError,
    check_topics,
    client_options,
    record_limits,
    stop_client,
    transactional_id,
    wait_for_kafka,
    watch_sasl_password,
)
from service.logs import configure_logging, log_loop_exceptions
from service.metrics import RelayMetrics
from service.relay import Relay, RelayConfig
from service.relay.committer import ReplicaFencedError
from service.scantrust.client import ScantrustClient
from service.settings import (
    KafkaSettings,
    Settings,
    SettingsError,
    insecure_choices,
    require_token,
    secrets,
)

log = structlog.get_logger(__name__)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CONFIG = 2
# After the group fenced this replica, a fresh incarnation starts after a backoff (1 s
# doubling to 30 s while it keeps being fenced within a minute of starting).
FENCED_RESTART_INITIAL_S: Final = 1.0
FENCED_RESTART_MAX_S: Final = 30.0
FENCED_STABLE_S: Final = 60.0
# aiokafka's default (5 minutes) would let a stuck member hold its partitions that long.
MAX_POLL_INTERVAL_MS = 60_000
# A transaction left open by a killed process blocks every read_committed reader of the
# topics it wrote (results, ledger, dead letters) until the broker aborts it. Ours last
# well under a second, so the broker may abort a dangling one after 10 s instead of 60 s.
TRANSACTION_TIMEOUT_MS = 10_000


def fitted_to_record_limits(config: RelayConfig, limits: Mapping[str, int]) -> RelayConfig:
    """The config with its byte bounds cut so that every record the relay writes fits
    the topic it goes to (`max.message.bytes`, read at start) and the producer."""

    def limit(topic: str) -> int:
        return min(PRODUCER_MAX_REQUEST_BYTES, limits.get(topic, PRODUCER_MAX_REQUEST_BYTES))

    topics = config.kafka
    dead_letter_max = max(
        1024,
        min(config.dead_letter_max_bytes, limit(topics.dlq_topic) - DEAD_LETTER_OVERHEAD_BYTES),
    )
    record_room = (
        min(limit(topics.tasks_topic), limit(topics.results_topic)) - RECORD_OVERHEAD_BYTES
    )
    asked = config.batching.batch_max_bytes
    batch_bytes = max(4096, min(asked, record_room))
    if batch_bytes < asked or dead_letter_max < config.dead_letter_max_bytes:
        log.warning(
            "record_bounds_cut_to_topic_limits",
            topic_limits=dict(limits),
            batch_max_bytes=batch_bytes,
            dead_letter_max_bytes=dead_letter_max,
        )
    return replace(
        config,
        batching=config.batching.model_copy(update={"batch_max_bytes": batch_bytes}),
        # The contract refuses an event with several constraint keys over this bound: it
        # is one request, never split.
        limits=replace(config.limits, batch_max_bytes=batch_bytes),
        dead_letter_max_bytes=dead_letter_max,
        dead_letter_prefix_bytes=min(config.dead_letter_prefix_bytes, dead_letter_max // 2),
    )


class _Starting:
    """Readiness and liveness until the relay is built, then the relay's own."""

    def __init__(self) -> None:
        self.relay: Relay | None = None
        self.phase = "starting: waiting for Kafka"
        self._beat = asyncio.get_running_loop().time()

    def beat(self) -> None:
        self._beat = asyncio.get_running_loop().time()

    def readiness(self) -> list[str]:
        return self.relay.readiness() if self.relay else [self.phase]

    def last_beat(self) -> float:
        return max(self._beat, self.relay.last_beat) if self.relay else self._beat


async def run_relay(
    settings: Settings,
    stop: asyncio.Event | None = None,
    registry: CollectorRegistry | None = None,
    signalled: Sequence[int] = (),
) -> int:
    """Run the relay until SIGTERM/SIGINT (or `stop`); return the exit code. `signalled`:
    such a signal came before the handlers were installed here (see `main`)."""
    stop = stop or asyncio.Event()
    try:
        require_token(settings.api)
    except SettingsError as exc:
        log.error("settings_invalid", problem=str(exc))
        return EXIT_CONFIG
    for setting, risk in insecure_choices(settings):
        log.warning("security_weakened_by_setting", setting=setting, risk=risk)
    loop = asyncio.get_running_loop()
    log_loop_exceptions(loop)
    with suppress(NotImplementedError, RuntimeError):
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
    if signalled:
        log.info("relay_stopping_on_early_signal", signals=sorted(set(signalled)))
        stop.set()
    try:
        async with AsyncExitStack() as stack:
            kafka = settings.kafka
            options = client_options(kafka)
            # Every Kafka client built, for a rotated SASL password file (weak: the
            # clients of an incarnation that ended go away).
            clients: weakref.WeakSet[Any] = weakref.WeakSet()
            watcher = asyncio.create_task(watch_sasl_password(kafka, options, clients))
            stack.callback(watcher.cancel)
            registry = registry or CollectorRegistry()
            metrics = RelayMetrics(registry)
            # Served from the start: while Kafka is awaited the relay is alive, not ready.
            starting = _Starting()
            http_app = build_http_app(registry, starting.readiness, starting.last_beat)
            port = await stack.enter_async_context(
                serving(http_app, settings.operations.http_host, settings.operations.http_port)
            )
            reached = await wait_for_kafka(
                kafka,
                options,
                wait_s=settings.kafka.startup_wait_s,
                stop=stop,
                alive=starting.beat,
            )
            if not reached:
                log.info("relay_stopped", before="Kafka answered")
                return EXIT_OK
            starting.phase = "starting: checking topics"
            admin = AIOKafkaAdminClient(**options)
            clients.add(admin)
            await admin.start()
            stack.push_async_callback(admin.close)
            await check_topics(admin, settings.kafka)
            limits = await record_limits(admin, settings.kafka)
            config = fitted_to_record_limits(RelayConfig.of(settings), limits)
            client = await stack.enter_async_context(ScantrustClient(settings.api, metrics))

            async def build(incarnation: AsyncExitStack) -> Relay:
                relay = await _build_relay(
                    incarnation, settings, config, kafka, options, client, admin, metrics, clients
                )
                log.info(
                    "relay_started",
                    http=f"http://{settings.operations.http_host}:{port}",
                    input_topic=settings.kafka.input_topic,
                    group_id=settings.kafka.group_id,
                    api=str(settings.api.base_url),
                )
                return relay

            await _run_incarnations(build, starting, stop)
    except KafkaSetupError as exc:
        log.error("kafka_setup_invalid", problem=str(exc))
        return EXIT_CONFIG
    except KafkaUnreachableError as exc:
        log.error("kafka_unavailable", problem=str(exc))
        return EXIT_FAILED
    except KafkaError as exc:
        log.error("kafka_unavailable", error=f"{type(exc).__name__}: {exc}")
        return EXIT_FAILED
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            with suppress(NotImplementedError, RuntimeError, ValueError):
                loop.remove_signal_handler(signum)
    log.info("relay_stopped")
    return EXIT_OK


async def _run_incarnations(
    build: Callable[[AsyncExitStack], Awaitable[Relay]],
    starting: _Starting,
    stop: asyncio.Event,
) -> None:
    """Run the relay until `stop`. When the consumer group fences it (its partitions moved
    while it was paused, cut off, or while the broker itself was paused past the session
    timeout), the incarnation is torn down (its last transaction was aborted, nothing of it
    was written) and a fresh one, with new consumers and producer and no state carried
    over, rejoins the group: what a restart of the process would do, without depending on
    a supervisor to restart it (docs/design.md section 11)."""
    loop = asyncio.get_running_loop()
    # Written out, not on tenacity (service/retrying.py): the restart count starts again
    # after an incarnation that ran FENCED_STABLE_S, where tenacity's only grows, and a
    # return or a stop between incarnations ends the loop, not a result.
    backoff = Backoff(FENCED_RESTART_INITIAL_S, FENCED_RESTART_MAX_S)
    rng = random.Random()  # noqa: S311 - jitter, not cryptography
    restarts = 0
    while not stop.is_set():
        began = loop.time()
        try:
            async with AsyncExitStack() as incarnation:
                relay = await build(incarnation)
                starting.relay = relay
                await relay.run(stop)
                return
        except BaseExceptionGroup as group:
            if group.subgroup(ReplicaFencedError) is None:
                raise
        finally:
            starting.relay = None
        starting.phase = "restarting: the consumer group fenced this replica"
        starting.beat()
        if loop.time() - began > FENCED_STABLE_S:
            restarts = 0
        wait = backoff.delay(restarts, rng)
        restarts += 1
        log.warning(
            "relay_restarting_fenced",
            restarts=restarts,
            in_s=round(wait, 1),
            hint="the group gave this replica's partitions away while it was stopped or cut "
            "off; a fresh incarnation rejoins (its open intents are resolved by their "
            "partitions' owners)",
        )
        with suppress(TimeoutError):
            async with asyncio.timeout(wait):
                await stop.wait()


async def _build_relay(
    stack: AsyncExitStack,
    settings: Settings,
    config: RelayConfig,
    kafka: KafkaSettings,
    options: dict[str, Any],
    client: ScantrustClient,
    admin: AIOKafkaAdminClient,
    metrics: RelayMetrics,
    clients: weakref.WeakSet[Any],
) -> Relay:
    producer = AIOKafkaProducer(
        transactional_id=transactional_id(kafka),
        transaction_timeout_ms=TRANSACTION_TIMEOUT_MS,
        enable_idempotence=True,
        acks="all",
        **options,
    )
    await producer.start()
    stack.push_async_callback(stop_client, producer)
    # Offset commits carry the group generation: a replica whose partitions moved while
    # it was paused can commit nothing (service/fencing.py).
    fencing.install(producer)
    # Offsets-only transactions back to back without a 100 ms pause (service/txn_backoff.py).
    txn_backoff.install(producer)
    # The input and the ledger are read by consumers that turn a record batch they cannot
    # decode into UndecodableRecordsError: its partition stops, never the process.
    consumer = DecodingConsumer(
        group_id=settings.kafka.group_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_committed",
        max_poll_interval_ms=MAX_POLL_INTERVAL_MS,
        rebalance_timeout_ms=rebalance_timeout_ms(settings),
        **options,
    )
    ledger_reader = DecodingConsumer(
        settings.kafka.tasks_topic,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_committed",
        **options,
    )
    # The poller's group decides which replica follows which ledger partition; its member
    # fetches nothing and asks where partitions end, so it reads uncommitted (the high
    # watermark, past any transaction a killed relay left open).
    poller_member = AIOKafkaConsumer(
        group_id=f"{settings.kafka.group_id}.task-poller",
        rebalance_timeout_ms=rebalance_timeout_ms(settings),
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_uncommitted",
        **options,
    )
    relay = Relay(
        config,
        consumer=consumer,
        producer=producer,
        ledger_reader=ledger_reader,
        poller_member=poller_member,
        admin=admin,
        client=client,
        metrics=metrics,
        membership=_GroupMembership(consumer, settings.kafka.group_id),
        # Results are published under the poller group's generation (ResultFence).
        result_membership=_GroupMembership(poller_member, f"{settings.kafka.group_id}.task-poller"),
        # The account's limits are divided by the partitions each replica owns.
        rate_share=client.limits,
        partitions_of=lambda topic: (
            consumer if topic == settings.kafka.input_topic else poller_member
        ).partitions_for_topic(topic),
    )
    clients.update((producer, consumer, ledger_reader, poller_member))
    consumer.subscribe([settings.kafka.input_topic], listener=relay.rebalance_listener())
    for kafka_consumer in (ledger_reader, poller_member, consumer):
        await kafka_consumer.start()
        # aiokafka's stop() does not call the revoke listener: Relay.run flushes and
        # commits before the stack stops the consumers.
        stack.push_async_callback(stop_client, kafka_consumer)
    return relay


# How much longer the group waits for a member to rejoin than the member's own revoke
# callback may take (SCM_RELAY_REBALANCE_TIMEOUT_S: the uploads and the commit it waits
# for): a member still in its callback is never dropped from the group while it works.
REBALANCE_MARGIN_S: Final = 10.0


def rebalance_timeout_ms(settings: Settings) -> int:
    """The group's rebalance timeout for the relay's members (aiokafka's default is the
    session timeout, 10 s, shorter than the revoke callback's own bound: a member still
    flushing was dropped, and its uploads raced the partitions' new owner)."""
    return int((settings.batching.rebalance_timeout_s + REBALANCE_MARGIN_S) * 1000)


class _GroupMembership:
    """A consumer's group membership (the input's, or the poller's), for fenced commits."""

    def __init__(self, consumer: AIOKafkaConsumer, group_id: str) -> None:
        self._consumer = consumer
        self._group_id = group_id

    def group(self) -> str:
        return fencing.membership(self._consumer, self._group_id)


# The cyclic garbage collector's first generation runs every 700 allocations by default
# and scans every young object; events live a few seconds in the relay's buffers, so each
# was scanned again and again: that took about a third of the relay's CPU in
# bench/throughput.py. The relay's objects hardly ever form cycles (reference counting
# frees them), so it collects every million allocations (a few seconds at full speed,
# one pause of some milliseconds) and promotes less often.
GC_THRESHOLDS: Final = (1_000_000, 10, 10)


def tune_garbage_collector() -> None:
    """Freeze what start-up allocated (modules, settings) out of every later collection,
    and collect young objects less often (see GC_THRESHOLDS)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def main(settings: Settings, signalled: Sequence[int] = ()) -> int:
    """Entry point of `scm-relay run`: a crash in any stage is logged and exits non-zero.
    `signalled`: SIGTERM or SIGINT received before the relay's handlers were in place
    (filled by the caller's own handler until then)."""
    configure_logging(
        settings.operations.log_format, settings.operations.log_level, secrets(settings)
    )
    tune_garbage_collector()
    try:
        return asyncio.run(run_relay(settings, signalled=signalled))
    except Exception:  # the last line of defence: say what killed the relay, then exit 1
        log.exception("relay_crashed")
        return EXIT_FAILED
