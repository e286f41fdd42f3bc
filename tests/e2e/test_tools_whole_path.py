"""The whole path as the people around the relay walk it, each step a command they run:
check the setup, publish a template CSV, let the relay upload it, find a dead letter,
replay its fix, follow the tasks, against the real broker, the simulator and the relay
as its own process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from devkit.harness import TopicFactory, make_topics, relay_process
from tests.api_support import simulator
from tests.integration.test_exactly_once import everything_settled
from tests.pipeline_support import publish, read_topic, relay_settings, results
from tests.tool_support import ToolRun, scm_relay

pytestmark = pytest.mark.kafka


async def dead_letters(bootstrap: str, topic: str, expected: int) -> None:
    arrived = await read_topic(bootstrap, topic, expected, timeout_s=60)
    assert len(arrived) == expected


@pytest.mark.timeout(300)
async def test_publish_relay_dlq_replay_and_tasks(
    kafka_bootstrap: str, topic_factory: TopicFactory, tmp_path: Path
) -> None:
    topics = await make_topics(topic_factory)
    async with simulator(codes_per_campaign=20) as sim:
        settings = relay_settings(kafka_bootstrap, sim.base_url, topics)

        async def tool(*args: str) -> ToolRun:
            return await scm_relay(settings, *args)

        check = await tool("check", "--json")
        assert check.json()["passed"], check.out

        campaign = 11
        codes = [f"11X{n:06d}" for n in range(3)]
        template = tmp_path / "template.csv"
        template.write_text(
            "extended_id,production_date,intended_market\n"
            + "".join(f"{code},2026-11-27,DE\n" for code in codes)
        )
        published = await tool(
            "publish", str(template), "--campaign", str(campaign), "--reference", "e2e", "--json"
        )
        assert published.code == 0, published.err
        # An upstream system of its own publishes an event the contract refuses.
        bad = {"constraints": {"extended_id": [codes[0]]}, "scm_data": {"status": "1"}}
        await publish(kafka_bootstrap, topics.input, [bad])

        async with relay_process(settings, tmp_path / "relay.log"):
            # The input committed to its end: past the commit marker of the transactional
            # publish too (no lag of one left on its partition).
            await everything_settled(kafka_bootstrap, topics, sim, timeout_s=120)
            await dead_letters(kafka_bootstrap, topics.dlq, expected=1)
            listed = await tool("dlq", "list", "--json")
            (letter,) = listed.json()["dead_letters"]
            assert letter["reason"] == "scm_data_key_status"
            assert letter["field"] == "scm_data.status"

            partition, offset = letter["offset"].split(":")
            fix = tmp_path / "fix.jsonl"
            fixed = {**bad, "scm_data": {"activation_status": "1"}, "campaign": campaign}
            fix.write_text(
                json.dumps({"partition": int(partition), "offset": int(offset), "event": fixed})
            )
            replayed = await tool("dlq", "replay", "--fixed", str(fix), "--json")
            assert replayed.code == 0, replayed.out + replayed.err
            assert replayed.json()["replayed"] == 1
            await results(kafka_bootstrap, topics.results, expected=2, timeout_s=120)
            finished = await everything_settled(kafka_bootstrap, topics, sim, timeout_s=120)

        assert len(finished) == 2
        tasks = await tool("tasks", "list", "--json")
        assert tasks.json()["matched"] == 2
        assert {row["state"] for row in tasks.json()["tasks"]} == {"complete"}
        first = next(o for o in finished if o["reference"] == "e2e")
        shown = await tool("tasks", "show", first["task_id"], "--json")
        view = shown.json()
        assert view["result"]["task_id"] == first["task_id"]
        assert view["api"]["state"] == "complete"
        assert view["ledger"] is None  # tombstoned once the result was published
        assert {e["event_id"] for e in view["result"]["events"]} == {
            e["event_id"] for e in first["events"]
        }
        group = await tool("tasks", "group", "e2e", "--json")
        assert group.json()["api"]["tasks_count"] == 1
        assert [t["task_id"] for t in group.json()["tasks"]] == [first["task_id"]]
        table = await tool("tasks", "show", first["task_id"])
        assert "the events it carried" in table.out
        missing = await tool("tasks", "show", "no-such-task")
        assert missing.code == 1
        again = await tool("dlq", "replay", "--json")
        assert again.json()["already_replayed"] == [letter["offset"]]
