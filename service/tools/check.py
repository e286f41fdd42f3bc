"""`scm-relay check`: probe every dependency with the relay's own settings.

One line per check, each saying what it found and, when it failed, what to fix.
Nothing is written that the relay reads: the topics are described, not produced
to; the transactional probe uses an id of its own (the relay's id with `-check`,
so that prefixed ACLs apply) and aborts its empty transaction; the API is asked
`GET /api/v2/me/` once. Exit 0 only when every check passed (warnings pass).
"""

from __future__ import annotations

import argparse
import asyncio
import os
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any, TypeVar

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import KafkaError
from tenacity import retry_if_exception, wait_fixed

from service.kafka import (
    PRODUCER_MAX_REQUEST_BYTES,
    RECORD_OVERHEAD_BYTES,
    KafkaSetupError,
    KafkaUnreachableError,
    client_options,
    ledger_cleanup_problem,
    probe_connection,
    readable_codecs,
    stop_client,
)
from service.retrying import call_with_retries
from service.scantrust.client import ScantrustClient
from service.scantrust.outcomes import AuthFailed, Misconfigured, Rejected, Throttled, Unavailable
from service.settings import (
    ApiSettings,
    KafkaSettings,
    Settings,
    SettingsError,
    load_settings,
    require_token,
    secrets,
)
from service.tools.output import Printer, quiet_logs

CALL_TIMEOUT_S = 20.0
RETRIABLE_FOR_S = 10.0
_T = TypeVar("_T")
EXIT_ALL_PASSED = 0
EXIT_SOME_FAILED = 1
EXIT_USAGE = 2


class Status(StrEnum):
    PASS = "pass"  # noqa: S105 - a verdict, not a password
    WARN = "warn"
    FAIL = "fail"


@dataclass(frozen=True)
class Check:
    """One check's verdict: what it found, and what to do when it is not a pass."""

    name: str
    status: Status
    found: str
    fix: str = ""


def run(args: argparse.Namespace) -> int:
    try:
        settings = load_settings(os.environ)
    except SettingsError as exc:
        checks = [Check("settings", Status.FAIL, str(exc), "fix the SCM_RELAY_* variable named")]
        return _report(checks, Printer(as_json=args.json))
    quiet_logs(settings.operations.log_level, secrets(settings))
    checks = asyncio.run(run_checks(settings))
    return _report(checks, Printer(as_json=args.json, secrets=secrets(settings)))


def _report(checks: list[Check], printer: Printer) -> int:
    failed = [check for check in checks if check.status is Status.FAIL]
    if printer.as_json:
        printer.json({"passed": not failed, "checks": [asdict(check) for check in checks]})
    else:
        printer.table(
            "scm-relay check",
            ["check", "status", "found", "fix"],
            [
                {"check": c.name, "status": c.status.upper(), "found": c.found, "fix": c.fix}
                for c in checks
            ],
        )
        printer.line(
            f"{len(failed)} of {len(checks)} checks failed" if failed else "every check passed"
        )
    return EXIT_SOME_FAILED if failed else EXIT_ALL_PASSED


async def run_checks(settings: Settings) -> list[Check]:
    """Every check, in order; Kafka's later checks are skipped when it is unreachable."""
    checks = [
        Check("settings", Status.PASS, "every SCM_RELAY_* setting is valid"),
        _check_codecs(),
    ]
    config = settings.kafka
    kafka = await _check_kafka(config)
    checks.append(kafka)
    if kafka.status is Status.PASS:
        options = client_options(config)
        admin = AIOKafkaAdminClient(**options, request_timeout_ms=int(CALL_TIMEOUT_S * 1000))
        try:
            async with asyncio.timeout(CALL_TIMEOUT_S):
                await admin.start()
            checks.extend(await _check_topics(admin, settings))
            checks.append(await _check_group(admin, settings))
        except (KafkaError, TimeoutError) as exc:
            checks.append(Check("topics", Status.FAIL, f"{type(exc).__name__}: {exc}"))
        finally:
            await admin.close()
        checks.append(await _check_transactions(config, options))
    try:
        require_token(settings.api)
    except SettingsError as exc:
        checks.append(Check("api token", Status.FAIL, str(exc), "set SCM_RELAY_API_TOKEN"))
        return checks
    checks.append(await _check_api(settings.api))
    return checks


def _check_codecs() -> Check:
    """The compression codecs this installation can read: records from any producer, or
    from a topic with `compression.type` set, may use any of the four Kafka defines."""
    codecs = readable_codecs()
    missing = [name for name, readable in codecs.items() if not readable]
    found = "reads " + ", ".join(name for name, readable in codecs.items() if readable)
    if missing:
        return Check(
            "codecs",
            Status.FAIL,
            f"{found}; cannot read {', '.join(missing)}",
            "install the relay with its locked dependencies (aiokafka's lz4, snappy and zstd "
            "extras: cramjam); a partition holding such records stops",
        )
    return Check("codecs", Status.PASS, found)


async def _check_kafka(config: KafkaSettings) -> Check:
    try:
        await probe_connection(config, client_options(config), timeout_s=10.0)
    except (KafkaSetupError, KafkaUnreachableError) as exc:
        return Check("kafka", Status.FAIL, str(exc), "see the settings the message names")
    return Check(
        "kafka",
        Status.PASS,
        f"{config.bootstrap_servers} answered over {config.security_protocol}",
    )


async def _topic_configs(admin: AIOKafkaAdminClient, names: list[str]) -> dict[str, dict[str, str]]:
    resources = [ConfigResource(ConfigResourceType.TOPIC, name) for name in names]
    configs: dict[str, dict[str, str]] = {}
    for response in await admin.describe_configs(resources):
        for _error, _message, _kind, name, entries in response.resources:
            configs[name] = {entry[0]: entry[1] for entry in entries}
    return configs


async def _replicas(admin: AIOKafkaAdminClient, topic: str) -> tuple[int, int]:
    (described,) = await admin.describe_topics([topic])
    partitions = described.get("partitions") or []
    return len(partitions), len(partitions[0].get("replicas") or []) if partitions else 0


async def _check_topics(admin: AIOKafkaAdminClient, settings: Settings) -> list[Check]:
    roles = [
        ("input topic", settings.kafka.input_topic, "SCM_RELAY_INPUT_TOPIC"),
        ("results topic", settings.kafka.results_topic, "SCM_RELAY_RESULTS_TOPIC"),
        ("dead-letter topic", settings.kafka.dlq_topic, "SCM_RELAY_DLQ_TOPIC"),
        ("ledger topic", settings.kafka.tasks_topic, "SCM_RELAY_TASKS_TOPIC"),
    ]
    existing = set(await admin.list_topics())
    present = [name for _role, name, _env in roles if name in existing]
    configs = await _topic_configs(admin, present) if present else {}
    checks = []
    for role, name, env in roles:
        if name not in existing:
            if role == "ledger topic":
                checks.append(
                    Check(role, Status.PASS, f"{name} absent: the relay creates it compacted")
                )
            else:
                checks.append(
                    Check(role, Status.FAIL, f"{name} does not exist", f"create it, or fix {env}")
                )
            continue
        config = configs.get(name, {})
        partitions, replicas = await _replicas(admin, name)
        min_isr = int(config.get("min.insync.replicas") or 1)
        max_bytes = int(config.get("max.message.bytes") or PRODUCER_MAX_REQUEST_BYTES)
        found = (
            f"{name}: {partitions} partitions, replication {replicas}, "
            f"min.insync.replicas {min_isr}, max.message.bytes {max_bytes}, "
            f"compression.type {config.get('compression.type') or 'producer'}"
        )
        problems, warnings = [], []
        cleanup = ledger_cleanup_problem(config.get("cleanup.policy"))
        if role == "ledger topic" and cleanup is not None:
            problems.append(f"set cleanup.policy=compact ({cleanup})")
        if min_isr > replicas:
            problems.append(
                f"min.insync.replicas {min_isr} > replication {replicas}: every write fails"
            )
        elif replicas < 3 or min_isr < 2:
            warnings.append("production wants replication 3 and min.insync.replicas 2")
        written = role in ("results topic", "ledger topic")
        if written and max_bytes < settings.batching.batch_max_bytes + RECORD_OVERHEAD_BYTES:
            warnings.append(
                f"max.message.bytes below SCM_RELAY_BATCH_MAX_BYTES + "
                f"{RECORD_OVERHEAD_BYTES // 1024} KiB: the relay cuts its batches to fit"
            )
        if problems:
            checks.append(Check(role, Status.FAIL, found, "; ".join(problems + warnings)))
        elif warnings:
            checks.append(Check(role, Status.WARN, found, "; ".join(warnings)))
        else:
            checks.append(Check(role, Status.PASS, found))
    return checks


async def _check_group(admin: AIOKafkaAdminClient, settings: Settings) -> Check:
    group = settings.kafka.group_id
    try:
        offsets = await _retrying(lambda: admin.list_consumer_group_offsets(group))
    except KafkaError as exc:
        return Check(
            "consumer group",
            Status.FAIL,
            f"{group}: {type(exc).__name__}: {exc}",
            "grant the relay's principal READ and DESCRIBE on the group (SCM_RELAY_KAFKA_GROUP_ID)",
        )
    committed = sum(1 for meta in offsets.values() if meta.offset >= 0)
    return Check(
        "consumer group", Status.PASS, f"{group}: offsets committed for {committed} partitions"
    )


async def _retrying(call: Callable[[], Awaitable[_T]]) -> _T:
    """`call`, again while Kafka answers with a retriable error (a fresh cluster creates
    its offsets topic at the first group call: "coordinator not available"), up to
    RETRIABLE_FOR_S."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + RETRIABLE_FOR_S
    return await call_with_retries(
        call,
        retry=retry_if_exception(lambda exc: isinstance(exc, KafkaError) and exc.retriable),
        wait=wait_fixed(0.5),
        stop=lambda _state: loop.time() > deadline,
    )


async def _check_transactions(config: KafkaSettings, options: dict[str, Any]) -> Check:
    # Stable (a new id per run would leave one more transactional state on the brokers
    # each time) and under the relay's own prefix, so that prefixed ACLs apply.
    probe_id = f"{config.transactional_id or config.group_id}-check"
    producer = AIOKafkaProducer(
        **options,
        transactional_id=probe_id,
        enable_idempotence=True,
        request_timeout_ms=int(CALL_TIMEOUT_S * 1000),
    )
    try:
        async with asyncio.timeout(CALL_TIMEOUT_S):
            await producer.start()
            await producer.begin_transaction()
            await producer.abort_transaction()
    except (KafkaError, TimeoutError) as exc:
        return Check(
            "transactions",
            Status.FAIL,
            f"transactional id {probe_id}: {type(exc).__name__}: {exc}",
            "grant WRITE and DESCRIBE on the relay's transactional ids (a prefix ACL) and "
            "IDEMPOTENT_WRITE on the cluster; check transaction.state.log.* on the brokers",
        )
    finally:
        await stop_client(producer)
    return Check("transactions", Status.PASS, f"a transaction opened and aborted as {probe_id}")


async def _check_api(config: ApiSettings) -> Check:
    async with ScantrustClient(config) as client:
        outcome = await client.me(retry=False)
    where = str(config.base_url)
    if isinstance(outcome, dict):
        who = outcome.get("email") or outcome.get("username") or outcome.get("id") or "a user"
        return Check("api", Status.PASS, f"{where} accepted the token (user {who})")
    if isinstance(outcome, AuthFailed):
        return Check(
            "api",
            Status.FAIL,
            f"{where} refused the token ({outcome.status})",
            "check SCM_RELAY_API_TOKEN (or SCM_RELAY_API_TOKEN_FILE) and its permissions",
        )
    if isinstance(outcome, Misconfigured | Rejected):
        return Check(
            "api",
            Status.FAIL,
            f"{where}api/v2/me/ answered {outcome.status}: not the Scantrust API there",
            "check SCM_RELAY_API_BASE_URL (e.g. https://api.scantrust.com/)",
        )
    if isinstance(outcome, Throttled):
        return Check("api", Status.WARN, f"{where} throttled the probe (429)", "try again")
    reason = outcome.reason if isinstance(outcome, Unavailable) else str(outcome)
    return Check(
        "api",
        Status.FAIL,
        f"{where} did not answer: {reason}",
        "check SCM_RELAY_API_BASE_URL, the network and SCM_RELAY_API_CA_FILE",
    )
