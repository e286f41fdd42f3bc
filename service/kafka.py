"""Kafka adapter helpers: client options from the Kafka settings, and topic checks.

Errors from Kafka are classified here into `KafkaSetupError` (bad configuration:
stop loudly, never retry) at start-up; errors while running are fatal to the
process and surface through the pipeline's task group.
"""

from __future__ import annotations

import asyncio
import os
import random
import socket
import ssl
from collections.abc import Callable, Iterable
from contextlib import suppress
from pathlib import Path
from typing import Any, Final

import structlog
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.codec import has_gzip, has_lz4, has_snappy, has_zstd
from aiokafka.conn import collect_hosts, create_conn
from aiokafka.errors import (
    IllegalSaslStateError,
    KafkaError,
    SaslAuthenticationFailed,
    UnsupportedSaslMechanismError,
)
from aiokafka.helpers import create_ssl_context
from aiokafka.protocol.metadata import MetadataRequest
from tenacity import RetryCallState, retry_if_exception_type

from service.core.resilience import Backoff
from service.logs import add_secret
from service.retrying import call_with_retries, last_failure, retries_before
from service.settings import KafkaSettings

log = structlog.get_logger(__name__)

# Ledger topic configuration: compacted, so finished tasks (tombstones) disappear and a
# rebuild reads only unfinished ones; tombstones are kept a day for slow readers.
LEDGER_TOPIC_CONFIG: Final = {
    "cleanup.policy": "compact",
    "delete.retention.ms": str(24 * 3600 * 1000),
    "min.compaction.lag.ms": "0",
}

# What a ledger or result record holds besides its constraint values, at the most: the
# events' sources (up to 1000), scm_data (up to 100 keys), a failed task's details.
RECORD_OVERHEAD_BYTES: Final = 256 * 1024
# Headers and framing of a dead letter besides its value.
DEAD_LETTER_OVERHEAD_BYTES: Final = 16 * 1024
# The producer's max.request.size (aiokafka's default, which the relay keeps).
PRODUCER_MAX_REQUEST_BYTES: Final = 1024 * 1024

# Waiting for Kafka at start: each probe is bounded; retries back off to half a minute.
STARTUP_PROBE_TIMEOUT_S: Final = 15.0
STARTUP_RETRY_INITIAL_S: Final = 1.0
STARTUP_RETRY_MAX_S: Final = 30.0


class KafkaSetupError(Exception):
    """Kafka is configured wrongly for the relay (missing topic, wrong topic config,
    refused credentials, untrusted certificate): stop and say which setting to fix."""


class KafkaUnreachableError(Exception):
    """No bootstrap server answered; the relay exits and its supervisor retries."""


# Every compression codec Kafka defines, and whether this process can decode it (aiokafka
# decodes gzip itself, the other three only with cramjam).
CODECS: Final = {"gzip": has_gzip, "snappy": has_snappy, "lz4": has_lz4, "zstd": has_zstd}


def readable_codecs() -> dict[str, bool]:
    """Each codec Kafka defines and whether records compressed with it can be read here."""
    return {name: available() for name, available in CODECS.items()}


class UndecodableRecordsError(KafkaError):  # type: ignore[misc]
    """A record batch of one partition could not be decoded (an unknown or unavailable
    codec, a CRC mismatch, a corrupt compressed payload): nothing at or after `offset`
    can be read from that partition. `partition` is None when aiokafka did not say which
    one failed (then every partition read in that call is suspect)."""

    def __init__(self, partition: TopicPartition | None, offset: int | None, cause: str) -> None:
        where = f"{partition.topic}:{partition.partition}" if partition else "unknown partition"
        at = f" at offset {offset}" if offset is not None else ""
        super().__init__(f"undecodable record batch in {where}{at}: {cause}")
        self.partition = partition
        self.offset = offset
        self.cause = cause


# The generator in aiokafka's fetcher that decodes a fetched partition's record batches
# (aiokafka.consumer.fetcher.PartitionRecords._unpack_records): whatever it raises, of any
# type, is a batch that cannot be decoded. Its locals name the partition (`tp`) and the
# batch (`next_batch`). Pinned by tests/integration/test_codecs.py, which fails if a new
# aiokafka renames them.
_DECODING_FRAME: Final = "_unpack_records"


def undecodable_batch(error: BaseException) -> UndecodableRecordsError | None:
    """The partition and offset of the record batch `error` was raised decoding, or None
    when `error` did not come from decoding a record batch (a real Kafka error)."""
    traceback = error.__traceback__
    while traceback is not None:
        frame = traceback.tb_frame
        if frame.f_code.co_name == _DECODING_FRAME and "aiokafka" in frame.f_code.co_filename:
            partition = frame.f_locals.get("tp")
            batch = frame.f_locals.get("next_batch")
            offset = getattr(batch, "base_offset", None)
            return UndecodableRecordsError(
                partition if isinstance(partition, TopicPartition) else None,
                offset if isinstance(offset, int) else None,
                f"{type(error).__name__}: {error}",
            )
        traceback = traceback.tb_next
    return None


async def stop_client(client: Any) -> None:
    """Stop an aiokafka consumer or producer.

    Why not `await client.stop()`: aiokafka's fetcher cancels its in-flight fetch tasks on
    stop and awaits them without catching their `CancelledError` (aio-libs/aiokafka#647,
    #983). A fetch sleeping in its retry backoff (a broker just died) then makes `stop()`
    raise `CancelledError` though nobody cancelled us: it escaped the teardown of an
    incarnation and ended the process instead of restarting the incarnation. Here a
    `CancelledError` is swallowed only when this task is not itself being cancelled.
    """
    try:
        await client.stop()
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            raise
        log.warning(
            "kafka_client_stop_interrupted",
            client=type(client).__name__,
            hint="aiokafka cancelled one of its own fetches while stopping; nothing was lost",
        )


class DecodingConsumer(AIOKafkaConsumer):  # type: ignore[misc]
    """aiokafka's consumer, with a record batch it cannot decode raised as
    `UndecodableRecordsError` (which partition, which offset) instead of whatever the
    decoder raised, so that the caller can stop that partition and read the others.

    Why the caller must also seek: when one partition fails to decode, aiokafka has
    already advanced the positions of the partitions it drained earlier in the same call,
    and their records are lost with the exception. Whoever catches this error must seek
    every partition back to the offset after the last record it took.
    """

    async def getmany(
        self, *partitions: TopicPartition, timeout_ms: int = 0, max_records: int | None = None
    ) -> dict[TopicPartition, list[Any]]:
        try:
            fetched: dict[TopicPartition, list[Any]] = await super().getmany(
                *partitions, timeout_ms=timeout_ms, max_records=max_records
            )
        except Exception as exc:  # classified here, where it enters: decoding or not
            undecodable = undecodable_batch(exc)
            if undecodable is None:
                raise
            raise undecodable from exc
        return fetched


def client_options(config: KafkaSettings) -> dict[str, Any]:
    """Connection and security options shared by every aiokafka client of the relay.

    Raises KafkaSetupError when a TLS file named by a setting cannot be used."""
    options: dict[str, Any] = {
        "bootstrap_servers": config.bootstrap_servers,
        "security_protocol": config.security_protocol,
        "client_id": f"scm-relay-{socket.gethostname()}",
    }
    if config.security_protocol in ("SSL", "SASL_SSL"):
        options["ssl_context"] = tls_context(config)
    if config.security_protocol.startswith("SASL_"):
        password = config.sasl_password
        options["sasl_mechanism"] = config.sasl_mechanism
        options["sasl_plain_username"] = config.sasl_username
        options["sasl_plain_password"] = password.get_secret_value() if password else None
    return options


# How often the SASL password file is looked at (the API token file's pace).
PASSWORD_FILE_EVERY_S: Final = 5.0


class SaslPasswordFile:
    """The SASL password, read again from its file (a rotated Secret) when the file
    changed, as the API token file is. A file that cannot be read or is empty keeps the
    current password, said in one line that never shows a value."""

    def __init__(self, path: Path, password: str) -> None:
        self._path = path
        self._password = password
        self._stamp: tuple[int, int] | None = None  # (mtime_ns, size) last read

    async def reload(self) -> str | None:
        """The new password when the file holds one (file I/O in a thread), else None."""
        path = self._path
        try:
            status = await asyncio.to_thread(os.stat, path)
            stamp = (status.st_mtime_ns, status.st_size)
            if stamp == self._stamp:
                return None
            password = (await asyncio.to_thread(path.read_text, encoding="utf-8")).strip()
        except (OSError, ValueError) as exc:
            log.error(
                "kafka_sasl_password_file_unusable", path=str(path), problem=type(exc).__name__
            )
            return None
        self._stamp = stamp
        if not password:
            log.error("kafka_sasl_password_file_unusable", path=str(path), problem="empty")
            return None
        if password == self._password:
            return None
        add_secret(password)
        self._password = password
        log.warning("kafka_sasl_password_reloaded", path=str(path))
        return password


def use_sasl_password(clients: Iterable[Any], password: str) -> None:
    """The clients' next connections (a broker restarted, a new broker) authenticate with
    `password`; open connections stay as they are (SASL runs once per connection)."""
    for client in clients:
        # The producer's client is `client`, the consumer's and the admin's `_client`;
        # aiokafka passes `_sasl_plain_password` to every connection it opens.
        inner = getattr(client, "client", None) or getattr(client, "_client", None) or client
        inner._sasl_plain_password = password


async def watch_sasl_password(
    config: KafkaSettings,
    options: dict[str, Any],
    clients: Iterable[Any],
    every_s: float = PASSWORD_FILE_EVERY_S,
) -> None:
    """Until cancelled: when the password file changes, the options of clients built
    from now on and the `clients` already built take the new password."""
    if config.sasl_password_file is None or config.sasl_password is None:
        return
    watched = SaslPasswordFile(config.sasl_password_file, config.sasl_password.get_secret_value())
    while True:
        await asyncio.sleep(every_s)
        password = await watched.reload()
        if password is not None:
            options["sasl_plain_password"] = password
            use_sasl_password(list(clients), password)


def tls_context(config: KafkaSettings) -> ssl.SSLContext:
    """The client TLS context: the CA file (or the system's CAs) and, when set, a client
    certificate. Hostname checking is always on."""
    cafile = config.ssl_cafile
    try:
        context: ssl.SSLContext = create_ssl_context(cafile=str(cafile) if cafile else None)
    except (OSError, ssl.SSLError) as exc:
        raise KafkaSetupError(
            f"SCM_RELAY_KAFKA_SSL_CAFILE {str(cafile)!r} is not a readable PEM CA bundle: {exc}"
        ) from exc
    if config.ssl_certfile:
        key_password = config.ssl_key_password
        try:
            context.load_cert_chain(
                certfile=config.ssl_certfile,
                keyfile=config.ssl_keyfile,
                password=key_password.get_secret_value() if key_password else None,
            )
        except (OSError, ssl.SSLError) as exc:
            raise KafkaSetupError(
                "the client certificate cannot be loaded from SCM_RELAY_KAFKA_SSL_CERTFILE "
                f"{str(config.ssl_certfile)!r} (key: SCM_RELAY_KAFKA_SSL_KEYFILE, "
                f"SCM_RELAY_KAFKA_SSL_KEY_PASSWORD): {exc}"
            ) from exc
    return context


async def probe_connection(
    config: KafkaSettings, options: dict[str, Any], timeout_s: float = 15.0
) -> None:
    """Connect to the bootstrap servers as every client will, and ask for metadata.

    aiokafka's own bootstrap logs a refused password and carries on until it gives up
    with "Unable to bootstrap"; this probe turns the cause into an error that names
    the setting to fix (KafkaSetupError), or KafkaUnreachableError when no server
    answered at all. The first server that answers ends the probe.
    """
    unreachable: list[str] = []
    for host, port, _family in collect_hosts(config.bootstrap_servers, randomize=False):
        try:
            async with asyncio.timeout(timeout_s):
                connection = await create_conn(
                    host,
                    port,
                    client_id=options["client_id"],
                    request_timeout_ms=int(timeout_s * 1000),
                    ssl_context=options.get("ssl_context"),
                    security_protocol=config.security_protocol,
                    sasl_mechanism=options.get("sasl_mechanism", "PLAIN"),
                    sasl_plain_username=options.get("sasl_plain_username"),
                    sasl_plain_password=options.get("sasl_plain_password"),
                )
                try:
                    await connection.send(MetadataRequest([]))
                finally:
                    connection.close()
        except SaslAuthenticationFailed as exc:
            raise KafkaSetupError(
                f"Kafka at {host}:{port} refused the SASL credentials: check "
                f"SCM_RELAY_KAFKA_SASL_USERNAME ({config.sasl_username!r}), "
                "SCM_RELAY_KAFKA_SASL_PASSWORD and SCM_RELAY_KAFKA_SASL_MECHANISM "
                f"({config.sasl_mechanism}): {exc}"
            ) from exc
        except UnsupportedSaslMechanismError as exc:
            raise KafkaSetupError(
                f"Kafka at {host}:{port} does not offer SCM_RELAY_KAFKA_SASL_MECHANISM "
                f"{config.sasl_mechanism} on this listener: {exc}"
            ) from exc
        except IllegalSaslStateError as exc:
            raise KafkaSetupError(
                f"Kafka at {host}:{port} is not a SASL listener: check "
                f"SCM_RELAY_KAFKA_SECURITY_PROTOCOL ({config.security_protocol}) "
                "and SCM_RELAY_KAFKA_BOOTSTRAP_SERVERS"
            ) from exc
        except ssl.SSLCertVerificationError as exc:
            cafile = config.ssl_cafile
            raise KafkaSetupError(
                f"the TLS certificate of Kafka at {host}:{port} is not trusted: "
                f"{exc.verify_message}; check SCM_RELAY_KAFKA_SSL_CAFILE "
                f"({str(cafile) if cafile else 'unset: the system CAs'})"
            ) from exc
        except ssl.SSLError as exc:
            raise KafkaSetupError(
                f"the TLS handshake with Kafka at {host}:{port} failed ({exc.reason}): "
                "check SCM_RELAY_KAFKA_SECURITY_PROTOCOL and the SCM_RELAY_KAFKA_SSL_* settings"
            ) from exc
        except (OSError, KafkaError, TimeoutError) as exc:
            unreachable.append(f"{host}:{port}: {type(exc).__name__}: {exc}")
            continue
        return
    raise KafkaUnreachableError(
        "no Kafka bootstrap server answered a metadata request over "
        f"{config.security_protocol} ({'; '.join(unreachable)}); check "
        "SCM_RELAY_KAFKA_BOOTSTRAP_SERVERS and that SCM_RELAY_KAFKA_SECURITY_PROTOCOL "
        "matches the listener"
    )


async def wait_for_kafka(
    config: KafkaSettings,
    options: dict[str, Any],
    *,
    wait_s: float,
    stop: asyncio.Event,
    alive: Callable[[], None],
    rng: random.Random | None = None,
) -> bool:
    """Probe the bootstrap servers until one answers (True), `stop` is set (False), or
    `wait_s` has passed (KafkaUnreachableError).

    A broker that is down (a maintenance of the whole cluster, a pod scheduled before
    Kafka) looks exactly like a wrong address or a listener of another protocol, so both
    are waited for, within `wait_s`; a refused credential or an untrusted certificate is
    told apart and raised at once (KafkaSetupError). `alive` is called on every attempt,
    so the liveness probe sees a process that is waiting, not stuck.
    """
    backoff = Backoff(STARTUP_RETRY_INITIAL_S, STARTUP_RETRY_MAX_S)
    rng = rng or random.Random()  # noqa: S311 - jitter, not cryptography
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_s
    retried = 0

    async def probe() -> None:
        alive()
        probe_timeout = min(STARTUP_PROBE_TIMEOUT_S, max(1.0, deadline - loop.time()))
        await probe_connection(config, options, probe_timeout)

    def pause(state: RetryCallState) -> float:
        return min(deadline - loop.time(), backoff.delay(retries_before(state), rng))

    def waiting(state: RetryCallState) -> None:
        nonlocal retried
        retried += 1
        log.warning(
            "kafka_waiting",
            attempt=state.attempt_number,
            retry_in_s=round(state.upcoming_sleep, 1),
            gives_up_in_s=round(deadline - loop.time()),
            problem=str(last_failure(state)),
        )

    def gave_up(state: RetryCallState) -> None:
        exc = last_failure(state)
        raise KafkaUnreachableError(f"after waiting {wait_s:g} s: {exc}") from exc

    async def sleep_unless_stopped(seconds: float) -> None:
        with suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await stop.wait()
        if stop.is_set():
            raise _StopWaiting

    try:
        await call_with_retries(
            probe,
            retry=retry_if_exception_type(KafkaUnreachableError),
            wait=pause,
            stop=lambda _state: deadline - loop.time() <= 0,
            before_sleep=waiting,
            give_up=gave_up,
            sleep=sleep_unless_stopped,
        )
    except _StopWaiting:
        return False
    if retried:
        log.info("kafka_reachable_at_start", attempts=retried + 1)
    return True


class _StopWaiting(Exception):
    """The relay was asked to stop while waiting for Kafka at start."""


def transactional_id(config: KafkaSettings) -> str:
    """The producer's transactional id: the setting, or one unique to this live process
    (group id, host name and process id), so replicas never fence each other."""
    if config.transactional_id:
        return config.transactional_id
    return f"{config.group_id}-{socket.gethostname()}-{os.getpid()}"


async def check_topics(admin: AIOKafkaAdminClient, topics: KafkaSettings) -> None:
    """The input, results and dead-letter topics must exist; the ledger topic is created
    (compacted) when missing, and refused when it exists without compaction or with
    `delete` beside it (`ledger_cleanup_problem`)."""
    existing = set(await admin.list_topics())
    missing = [
        f"{name} ({env})"
        for name, env in (
            (topics.input_topic, "SCM_RELAY_INPUT_TOPIC"),
            (topics.results_topic, "SCM_RELAY_RESULTS_TOPIC"),
            (topics.dlq_topic, "SCM_RELAY_DLQ_TOPIC"),
        )
        if name not in existing
    ]
    if missing:
        raise KafkaSetupError(f"missing Kafka topics: {', '.join(missing)}; create them first")
    if topics.tasks_topic not in existing:
        partitions, replicas = await _layout(admin, topics.input_topic)
        topic = NewTopic(
            name=topics.tasks_topic,
            num_partitions=partitions,
            replication_factor=replicas,
            topic_configs=LEDGER_TOPIC_CONFIG,
        )
        response = await admin.create_topics([topic])
        errors = [error for error in response.topic_errors if error[1] not in (0, 36)]
        if errors:
            raise KafkaSetupError(f"cannot create the ledger topic {topics.tasks_topic}: {errors}")
        return
    resource = ConfigResource(ConfigResourceType.TOPIC, topics.tasks_topic)
    (described,) = await admin.describe_configs([resource])
    configs = {entry[0]: entry[1] for entry in described.resources[0][4]}
    problem = ledger_cleanup_problem(configs.get("cleanup.policy"))
    if problem is not None:
        raise KafkaSetupError(
            f"the ledger topic {topics.tasks_topic} (SCM_RELAY_TASKS_TOPIC) must have "
            f"cleanup.policy=compact, {problem}"
        )


def ledger_cleanup_problem(policy: str | None) -> str | None:
    """What is wrong with the ledger's `cleanup.policy` (said after "must have
    cleanup.policy=compact, "), or None. Compaction is required (finished tasks must go);
    `delete` beside it is refused: time and size retention (`retention.ms`,
    `retention.bytes`) would then remove records by age, however long an intent stays
    open or a task unfinished, and the relay would send their events again or never
    report their results."""
    parts = {part.strip() for part in (policy or "").split(",")}
    if "compact" not in parts:
        return f"it has {policy!r}"
    if "delete" in parts:
        return (
            f"it has {policy!r}: with delete, retention removes records by age or size, "
            "open intents and unfinished tasks with them"
        )
    return None


async def record_limits(admin: AIOKafkaAdminClient, topics: KafkaSettings) -> dict[str, int]:
    """`max.message.bytes` of each topic the relay writes (results, dead letters,
    ledger): a record over it is refused and its transaction with it."""
    names = (topics.results_topic, topics.dlq_topic, topics.tasks_topic)
    resources = [ConfigResource(ConfigResourceType.TOPIC, name) for name in names]
    limits: dict[str, int] = {}
    for response in await admin.describe_configs(resources):
        for _error, _message, _kind, name, entries in response.resources:
            for entry in entries:
                if entry[0] == "max.message.bytes" and entry[1]:
                    limits[name] = int(entry[1])
    return limits


async def _layout(admin: AIOKafkaAdminClient, topic: str) -> tuple[int, int]:
    """Partitions and replication factor of `topic`: the ledger copies the input's."""
    (description,) = await admin.describe_topics([topic])
    partitions = description.get("partitions") or [] if isinstance(description, dict) else []
    replicas = len(partitions[0].get("replicas") or [1]) if partitions else 1
    return max(1, len(partitions)), max(1, replicas)
