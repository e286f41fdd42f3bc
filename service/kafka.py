"""Kafka adapter helpers: client options from the settings, and topic checks.

Errors from Kafka are classified here into `KafkaSetupError` (bad configuration:
stop loudly, never retry) at start-up; errors while running are fatal to the
process and surface through the pipeline's task group.
"""

from __future__ import annotations

import asyncio
import os
import socket
from typing import Any, Final

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.helpers import create_ssl_context

from service.settings import Settings

# Ledger topic configuration: compacted, so finished tasks (tombstones) disappear and a
# rebuild reads only unfinished ones; tombstones are kept a day for slow readers.
LEDGER_TOPIC_CONFIG: Final = {
    "cleanup.policy": "compact",
    "delete.retention.ms": str(24 * 3600 * 1000),
    "min.compaction.lag.ms": "0",
}


class KafkaSetupError(Exception):
    """Kafka is configured wrongly for the relay (missing topic, wrong topic config)."""


def client_options(settings: Settings) -> dict[str, Any]:
    """Connection and security options shared by every aiokafka client of the relay."""
    options: dict[str, Any] = {
        "bootstrap_servers": settings.kafka_bootstrap_servers,
        "security_protocol": settings.kafka_security_protocol,
        "client_id": f"scm-relay-{socket.gethostname()}",
    }
    if settings.kafka_security_protocol in ("SSL", "SASL_SSL"):
        options["ssl_context"] = create_ssl_context(
            cafile=str(settings.kafka_ssl_cafile) if settings.kafka_ssl_cafile else None
        )
    if settings.kafka_security_protocol.startswith("SASL_"):
        password = settings.kafka_sasl_password
        options["sasl_mechanism"] = settings.kafka_sasl_mechanism
        options["sasl_plain_username"] = settings.kafka_sasl_username
        options["sasl_plain_password"] = password.get_secret_value() if password else None
    return options


def transactional_id(settings: Settings) -> str:
    """The producer's transactional id: the setting, or one unique to this live process
    (group id, host name and process id), so replicas never fence each other."""
    if settings.kafka_transactional_id:
        return settings.kafka_transactional_id
    return f"{settings.kafka_group_id}-{socket.gethostname()}-{os.getpid()}"


async def check_topics(admin: AIOKafkaAdminClient, settings: Settings) -> None:
    """The input, results and dead-letter topics must exist; the ledger topic is created
    (compacted) when missing, and refused when it exists without compaction."""
    existing = set(await admin.list_topics())
    missing = [
        f"{name} ({env})"
        for name, env in (
            (settings.input_topic, "SCM_RELAY_INPUT_TOPIC"),
            (settings.results_topic, "SCM_RELAY_RESULTS_TOPIC"),
            (settings.dlq_topic, "SCM_RELAY_DLQ_TOPIC"),
        )
        if name not in existing
    ]
    if missing:
        raise KafkaSetupError(f"missing Kafka topics: {', '.join(missing)}; create them first")
    if settings.tasks_topic not in existing:
        partitions, replicas = await _layout(admin, settings.input_topic)
        topic = NewTopic(
            name=settings.tasks_topic,
            num_partitions=partitions,
            replication_factor=replicas,
            topic_configs=LEDGER_TOPIC_CONFIG,
        )
        response = await admin.create_topics([topic])
        errors = [error for error in response.topic_errors if error[1] not in (0, 36)]
        if errors:
            raise KafkaSetupError(
                f"cannot create the ledger topic {settings.tasks_topic}: {errors}"
            )
        return
    resource = ConfigResource(ConfigResourceType.TOPIC, settings.tasks_topic)
    (described,) = await admin.describe_configs([resource])
    configs = {entry[0]: entry[1] for entry in described.resources[0][4]}
    if "compact" not in (configs.get("cleanup.policy") or ""):
        raise KafkaSetupError(
            f"the ledger topic {settings.tasks_topic} (SCM_RELAY_TASKS_TOPIC) must have "
            f"cleanup.policy=compact, it has {configs.get('cleanup.policy')!r}"
        )


async def _wait_for_leaders(admin: AIOKafkaAdminClient, topic: str, attempts: int = 100) -> None:
    """A new topic takes a moment to get a leader for every partition; writes before that
    are retried by the producer, which would stall the first transactions."""
    for _ in range(attempts):
        (description,) = await admin.describe_topics([topic])
        partitions = description.get("partitions") or [] if isinstance(description, dict) else []
        if partitions and all(p.get("leader", -1) >= 0 and p.get("isr") for p in partitions):
            return
        await asyncio.sleep(0.1)


async def _layout(admin: AIOKafkaAdminClient, topic: str) -> tuple[int, int]:
    """Partitions and replication factor of `topic`: the ledger copies the input's."""
    (description,) = await admin.describe_topics([topic])
    partitions = description.get("partitions") or [] if isinstance(description, dict) else []
    replicas = len(partitions[0].get("replicas") or [1]) if partitions else 1
    return max(1, len(partitions)), max(1, replicas)
