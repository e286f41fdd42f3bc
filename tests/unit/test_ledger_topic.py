"""The start-up check of the ledger topic: compacted, and never deleted by retention."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

from service.kafka import KafkaSetupError, check_topics
from service.settings import KafkaSettings

TOPICS = KafkaSettings(
    input_topic="scm.changes",
    results_topic="scm.results",
    dlq_topic="scm.dlq",
    tasks_topic="scm.tasks",
)


@dataclass
class _Described:
    resources: list[tuple[int, str, int, str, list[tuple[str, str]]]]


class LedgerAdmin:
    """An admin client that knows every topic and the ledger's cleanup.policy."""

    def __init__(self, policy: str) -> None:
        self.policy = policy

    async def list_topics(self) -> list[str]:
        return [TOPICS.input_topic, TOPICS.results_topic, TOPICS.dlq_topic, TOPICS.tasks_topic]

    async def describe_configs(self, resources: list[Any]) -> list[_Described]:
        entries = [("cleanup.policy", self.policy), ("retention.ms", "604800000")]
        return [_Described([(0, "", 2, TOPICS.tasks_topic, entries)])]


@pytest.mark.parametrize("policy", ["compact,delete", "delete,compact", "delete, compact"])
async def test_a_ledger_that_retention_may_delete_from_is_refused(policy: str) -> None:
    with pytest.raises(KafkaSetupError) as refused:
        await check_topics(LedgerAdmin(policy), TOPICS)
    message = str(refused.value)
    assert "SCM_RELAY_TASKS_TOPIC" in message
    assert f"must have cleanup.policy=compact, it has {policy!r}" in message
    assert "open intents and unfinished tasks" in message


async def test_a_ledger_without_compaction_is_refused_and_a_compacted_one_passes() -> None:
    with pytest.raises(KafkaSetupError) as refused:
        await check_topics(LedgerAdmin("delete"), TOPICS)
    assert "must have cleanup.policy=compact, it has 'delete'" in str(refused.value)
    await check_topics(LedgerAdmin("compact"), TOPICS)
