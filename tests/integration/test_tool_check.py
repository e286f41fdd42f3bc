"""`scm-relay check` against the real broker and the simulator, one misconfiguration
at a time: each fails its own check with what to fix, and the others still pass."""

from __future__ import annotations

from typing import Any

import pytest

from devkit.harness import TopicFactory, Topics, admin_client, make_topics
from service.kafka import check_topics
from service.settings import KafkaSettings
from tests.api_support import TOKEN, simulator
from tests.tool_support import ToolRun, scm_relay, tool_settings

pytestmark = pytest.mark.kafka


def verdicts(run: ToolRun) -> dict[str, dict[str, Any]]:
    return {check["name"]: check for check in run.json()["checks"]}


async def check(bootstrap: str, api_url: str, topics: Topics, **overrides: Any) -> ToolRun:
    settings = tool_settings(bootstrap, api_url, topics, **overrides)
    return await scm_relay(settings, "check", "--json")


async def test_a_sound_setup_passes_every_check(
    kafka_bootstrap: str, topic_factory: TopicFactory
) -> None:
    topics = await make_topics(topic_factory)
    async with simulator() as sim:
        run = await check(kafka_bootstrap, sim.base_url, topics)
        table = await scm_relay(tool_settings(kafka_bootstrap, sim.base_url, topics), "check")
    assert run.code == 0, run.out + run.err
    found = verdicts(run)
    assert [name for name, c in found.items() if c["status"] == "fail"] == []
    assert set(found) >= {
        "settings",
        "codecs",
        "kafka",
        "input topic",
        "results topic",
        "dead-letter topic",
        "ledger topic",
        "consumer group",
        "transactions",
        "api",
    }
    assert found["codecs"]["found"] == "reads gzip, snappy, lz4, zstd"
    assert "compression.type producer" in found["input topic"]["found"]
    assert "absent: the relay creates it compacted" in found["ledger topic"]["found"]
    # One broker: replication 1 is named as a warning, not a failure.
    assert found["input topic"]["status"] == "warn"
    assert "replication 3" in found["input topic"]["fix"]
    assert table.code == 0
    assert "every check passed" in table.out
    assert TOKEN not in table.out + run.out


async def test_a_wrong_token_fails_the_api_check_and_is_never_printed(
    kafka_bootstrap: str, topic_factory: TopicFactory
) -> None:
    topics = await make_topics(topic_factory)
    wrong = "not-the-token-but-a-secret-all-the-same"
    async with simulator() as sim:
        run = await check(kafka_bootstrap, sim.base_url, topics, api_token=wrong)
    assert run.code == 1
    api = verdicts(run)["api"]
    assert api["status"] == "fail"
    assert "refused the token (401)" in api["found"]
    assert "SCM_RELAY_API_TOKEN" in api["fix"]
    assert verdicts(run)["kafka"]["status"] == "pass"
    assert wrong not in run.out + run.err


async def test_a_wrong_base_url_is_named_as_such(
    kafka_bootstrap: str, topic_factory: TopicFactory
) -> None:
    topics = await make_topics(topic_factory)
    async with simulator() as sim:
        run = await check(kafka_bootstrap, f"{sim.base_url}/not-the-api/", topics)
    assert run.code == 1
    api = verdicts(run)["api"]
    assert "not the Scantrust API there" in api["found"]
    assert "SCM_RELAY_API_BASE_URL" in api["fix"]


async def test_an_unreachable_api_fails_with_what_to_check(
    kafka_bootstrap: str, topic_factory: TopicFactory
) -> None:
    topics = await make_topics(topic_factory)
    run = await check(kafka_bootstrap, "http://127.0.0.1:9/", topics, api_connect_timeout_s=1.0)
    assert run.code == 1
    assert "did not answer" in verdicts(run)["api"]["found"]


async def test_a_missing_topic_fails_its_check_only(
    kafka_bootstrap: str, topic_factory: TopicFactory
) -> None:
    topics = await make_topics(topic_factory)
    topics.results = "scm-results-that-nobody-created"
    async with simulator() as sim:
        run = await check(kafka_bootstrap, sim.base_url, topics)
    assert run.code == 1
    found = verdicts(run)
    assert found["results topic"]["status"] == "fail"
    assert "does not exist" in found["results topic"]["found"]
    assert "SCM_RELAY_RESULTS_TOPIC" in found["results topic"]["fix"]
    assert found["input topic"]["status"] != "fail"
    assert found["api"]["status"] == "pass"


@pytest.mark.parametrize(
    ("policy", "said"),
    [
        ("delete", "set cleanup.policy=compact (it has 'delete')"),
        # Time and size retention would remove open intents and unfinished tasks: the
        # relay refuses to start on it, and the check says the same.
        (
            "compact,delete",
            "set cleanup.policy=compact (it has 'compact,delete': with delete, retention "
            "removes records by age or size, open intents and unfinished tasks with them)",
        ),
    ],
)
async def test_a_ledger_without_compaction_or_with_delete_fails(
    kafka_bootstrap: str, topic_factory: TopicFactory, policy: str, said: str
) -> None:
    topics = await make_topics(topic_factory)
    topics.tasks = await topic_factory.create("scm-tasks", config={"cleanup.policy": policy})
    async with simulator() as sim:
        run = await check(kafka_bootstrap, sim.base_url, topics)
    assert run.code == 1
    ledger = verdicts(run)["ledger topic"]
    assert ledger["status"] == "fail"
    assert said in ledger["fix"]


async def test_a_ledger_the_relay_created_passes(
    kafka_bootstrap: str, topic_factory: TopicFactory
) -> None:
    topics = await make_topics(topic_factory)
    async with admin_client(kafka_bootstrap) as admin:
        await check_topics(
            admin,
            KafkaSettings(
                input_topic=topics.input,
                results_topic=topics.results,
                dlq_topic=topics.dlq,
                tasks_topic=topics.tasks,
            ),
        )
    async with simulator() as sim:
        run = await check(kafka_bootstrap, sim.base_url, topics)
    assert verdicts(run)["ledger topic"]["status"] != "fail", run.out


async def test_kafka_unreachable_fails_and_skips_the_topic_checks(
    topic_factory: TopicFactory,
) -> None:
    topics = await make_topics(topic_factory)
    async with simulator() as sim:
        run = await check("127.0.0.1:9", sim.base_url, topics)
    assert run.code == 1
    found = verdicts(run)
    assert found["kafka"]["status"] == "fail"
    assert "SCM_RELAY_KAFKA_BOOTSTRAP_SERVERS" in found["kafka"]["found"]
    assert "input topic" not in found
    assert found["api"]["status"] == "pass"


async def test_invalid_settings_are_one_failing_check(
    kafka_bootstrap: str, topic_factory: TopicFactory
) -> None:
    topics = await make_topics(topic_factory)
    settings = tool_settings(kafka_bootstrap, "http://127.0.0.1:9/", topics)
    run = await scm_relay(
        settings, "check", "--json", extra_env={"SCM_RELAY_BATCH_MAX_VALUES": "5000"}
    )
    assert run.code == 1
    (only,) = run.json()["checks"]
    assert only["name"] == "settings"
    assert "SCM_RELAY_BATCH_MAX_VALUES" in only["found"]
