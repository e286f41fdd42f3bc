"""The composition root: settings in, every client built and entered in one exit stack.

Only this module (and the CLI that calls it) builds Kafka clients, the HTTP
session and the logger configuration. Signal handlers only set an event;
shutdown then runs in a fixed order inside `Relay.run`. Settings become each
part's own config here and nowhere else.
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
from service.core.contract_limits import ContractLimits
from service.core.resilience import Backoff
from service.http import build_http_app, serving
from service.kafka import (
    DecodingConsumer,
    KafkaConfig,
    KafkaSetupError,
    KafkaUnreachableError,
    RelayTopics,
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
from service.scantrust.client import ClientConfig, ScantrustClient
from service.settings import Settings, SettingsError, insecure_choices

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


def contract_limits(settings: Settings) -> ContractLimits:
    """The event-contract limits the settings set."""
    return ContractLimits(
        max_record_bytes=settings.max_record_bytes,
        max_values_per_event=settings.max_values_per_event,
        max_scm_data_keys=settings.max_scm_data_keys,
        max_key_length=settings.max_key_length,
        max_value_length=settings.max_value_length,
        max_reference_length=settings.max_reference_length,
        max_event_id_length=settings.max_event_id_length,
        one_code_per_value_keys=settings.one_code_per_value_keys,
        batch_max_values=settings.batch_max_values,
        batch_max_bytes=settings.batch_max_bytes,
    )


def relay_config(settings: Settings) -> RelayConfig:
    """The relay's view of the settings."""
    return RelayConfig(
        input_topic=settings.input_topic,
        results_topic=settings.results_topic,
        dlq_topic=settings.dlq_topic,
        tasks_topic=settings.tasks_topic,
        group_id=settings.kafka_group_id,
        limits=contract_limits(settings),
        batch_max_values=settings.batch_max_values,
        batch_max_bytes=settings.batch_max_bytes,
        batch_max_keys=settings.batch_max_keys,
        batch_linger_s=settings.batch_linger_ms / 1000,
        max_in_flight_requests=settings.max_in_flight_requests,
        max_open_batches=settings.max_open_batches,
        max_buffered_values=settings.max_buffered_values,
        max_read_ahead=settings.max_read_ahead,
        max_unfinished_tasks=settings.max_unfinished_tasks,
        shutdown_timeout_s=settings.shutdown_timeout_s,
        upload_grace_s=settings.api_request_timeout_s,
        rebalance_timeout_s=settings.rebalance_timeout_s,
        poll_initial_s=settings.poll_initial_s,
        poll_factor=settings.poll_factor,
        poll_max_s=settings.poll_max_s,
        task_stuck_after_s=settings.task_stuck_after_s,
        status_chunk_size=settings.api_status_chunk_size,
        retry_initial_s=settings.api_retry_initial_s,
        retry_max_backoff_s=settings.api_retry_max_backoff_s,
        reconcile_after_s=settings.api_request_timeout_s,
        list_lag_s=settings.api_list_lag_s,
    )


# What a ledger or result record holds besides its constraint values, at the most: the
# events' sources (up to 1000), scm_data (up to 100 keys), a failed task's details.
RECORD_OVERHEAD_BYTES: Final = 256 * 1024
# Headers and framing of a dead letter besides its value.
DEAD_LETTER_OVERHEAD_BYTES: Final = 16 * 1024
# The producer's max.request.size (aiokafka's default, which the relay keeps).
PRODUCER_MAX_REQUEST_BYTES: Final = 1024 * 1024


def fitted_to_record_limits(config: RelayConfig, limits: Mapping[str, int]) -> RelayConfig:
    """The config with its byte bounds cut so that every record the relay writes fits
    the topic it goes to (`max.message.bytes`, read at start) and the producer."""

    def limit(topic: str) -> int:
        return min(PRODUCER_MAX_REQUEST_BYTES, limits.get(topic, PRODUCER_MAX_REQUEST_BYTES))

    dead_letter_max = max(
        1024,
        min(config.dead_letter_max_bytes, limit(config.dlq_topic) - DEAD_LETTER_OVERHEAD_BYTES),
    )
    record_room = (
        min(limit(config.tasks_topic), limit(config.results_topic)) - RECORD_OVERHEAD_BYTES
    )
    batch_bytes = max(4096, min(config.batch_max_bytes, record_room))
    if batch_bytes < config.batch_max_bytes or dead_letter_max < config.dead_letter_max_bytes:
        log.warning(
            "record_bounds_cut_to_topic_limits",
            topic_limits=dict(limits),
            batch_max_bytes=batch_bytes,
            dead_letter_max_bytes=dead_letter_max,
        )
    return replace(
        config,
        batch_max_bytes=batch_bytes,
        # The contract refuses an event with several constraint keys over this bound: it
        # is one request, never split.
        limits=replace(config.limits, batch_max_bytes=batch_bytes),
        dead_letter_max_bytes=dead_letter_max,
        dead_letter_prefix_bytes=min(config.dead_letter_prefix_bytes, dead_letter_max // 2),
    )


def client_config(settings: Settings) -> ClientConfig:
    """The API client's view of the settings; the token is required."""
    if settings.api_token is None:
        raise SettingsError(
            "SCM_RELAY_API_TOKEN (or SCM_RELAY_API_TOKEN_FILE) is required to call the API"
        )
    return ClientConfig(
        base_url=str(settings.api_base_url),
        token=settings.api_token,
        connect_timeout_s=settings.api_connect_timeout_s,
        request_timeout_s=settings.api_request_timeout_s,
        max_connections=settings.api_max_connections,
        max_response_bytes=settings.api_max_response_bytes,
        ca_file=settings.api_ca_file,
        upload_rate_per_s=settings.upload_rate_per_s,
        overall_rate_per_min=settings.api_rate_per_min,
        retry_initial_s=settings.api_retry_initial_s,
        retry_max_backoff_s=settings.api_retry_max_backoff_s,
        retry_after_max_s=settings.api_retry_after_max_s,
        retry_max_elapsed_s=settings.api_retry_max_elapsed_s,
        breaker_failures=settings.api_breaker_failures,
        breaker_cooldown_s=settings.api_breaker_cooldown_s,
        status_chunk_size=settings.api_status_chunk_size,
        token_file=settings.api_token_file,
    )


def kafka_config(settings: Settings) -> KafkaConfig:
    """How to reach Kafka, from the settings."""
    return KafkaConfig(
        bootstrap_servers=settings.kafka_bootstrap_servers,
        group_id=settings.kafka_group_id,
        security_protocol=settings.kafka_security_protocol,
        sasl_mechanism=settings.kafka_sasl_mechanism,
        sasl_username=settings.kafka_sasl_username,
        sasl_password=settings.kafka_sasl_password,
        ssl_cafile=settings.kafka_ssl_cafile,
        ssl_certfile=settings.kafka_ssl_certfile,
        ssl_keyfile=settings.kafka_ssl_keyfile,
        ssl_key_password=settings.kafka_ssl_key_password,
        transactional_id=settings.kafka_transactional_id,
        sasl_password_file=settings.kafka_sasl_password_file,
    )


def relay_topics(settings: Settings) -> RelayTopics:
    """The topic names the settings give."""
    return RelayTopics(
        input=settings.input_topic,
        results=settings.results_topic,
        dlq=settings.dlq_topic,
        tasks=settings.tasks_topic,
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
        api_config = client_config(settings)
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
            kafka = kafka_config(settings)
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
                serving(http_app, settings.http_host, settings.http_port)
            )
            reached = await wait_for_kafka(
                kafka,
                options,
                wait_s=settings.kafka_startup_wait_s,
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
            await check_topics(admin, relay_topics(settings))
            limits = await record_limits(admin, relay_topics(settings))
            config = fitted_to_record_limits(relay_config(settings), limits)
            client = await stack.enter_async_context(ScantrustClient(api_config, metrics))

            async def build(incarnation: AsyncExitStack) -> Relay:
                relay = await _build_relay(
                    incarnation, settings, config, kafka, options, client, admin, metrics, clients
                )
                log.info(
                    "relay_started",
                    http=f"http://{settings.http_host}:{port}",
                    input_topic=settings.input_topic,
                    group_id=settings.kafka_group_id,
                    api=str(settings.api_base_url),
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
    kafka: KafkaConfig,
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
        group_id=settings.kafka_group_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_committed",
        max_poll_interval_ms=MAX_POLL_INTERVAL_MS,
        rebalance_timeout_ms=rebalance_timeout_ms(settings),
        **options,
    )
    ledger_reader = DecodingConsumer(
        settings.tasks_topic,
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
        group_id=f"{settings.kafka_group_id}.task-poller",
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
        membership=_GroupMembership(consumer, settings.kafka_group_id),
        # Results are published under the poller group's generation (ResultFence).
        result_membership=_GroupMembership(poller_member, f"{settings.kafka_group_id}.task-poller"),
        # The account's limits are divided by the partitions each replica owns.
        rate_share=client.limits,
        partitions_of=lambda topic: (
            consumer if topic == settings.input_topic else poller_member
        ).partitions_for_topic(topic),
    )
    clients.update((producer, consumer, ledger_reader, poller_member))
    consumer.subscribe([settings.input_topic], listener=relay.rebalance_listener())
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
    return int((settings.rebalance_timeout_s + REBALANCE_MARGIN_S) * 1000)


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


def secrets(settings: Settings) -> list[str]:
    """Every secret the settings hold: none of them may reach a log line."""
    held = (settings.api_token, settings.kafka_sasl_password, settings.kafka_ssl_key_password)
    return [secret.get_secret_value() for secret in held if secret is not None]


def main(settings: Settings, signalled: Sequence[int] = ()) -> int:
    """Entry point of `scm-relay run`: a crash in any stage is logged and exits non-zero.
    `signalled`: SIGTERM or SIGINT received before the relay's handlers were in place
    (filled by the caller's own handler until then)."""
    configure_logging(settings.log_format, settings.log_level, secrets(settings))
    tune_garbage_collector()
    try:
        return asyncio.run(run_relay(settings, signalled=signalled))
    except Exception:  # the last line of defence: say what killed the relay, then exit 1
        log.exception("relay_crashed")
        return EXIT_FAILED
