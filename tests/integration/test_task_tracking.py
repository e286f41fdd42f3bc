"""Task tracking: one result per task, short and failed outcomes, bulk polling, the demo."""

from __future__ import annotations

import asyncio
import json
import math
import signal
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from devkit.demo import run_demo
from devkit.harness import TopicFactory, make_topics, relay_process, wait_until
from devkit.simulator.state import Faults
from tests.api_support import simulator
from tests.pipeline_support import (
    event,
    holds_partitions,
    ledger_task_ids,
    publish,
    read_topic,
    relay_settings,
    results,
    running_relay,
    sigkill_while_uploading,
    wait_for_commit,
)

pytestmark = pytest.mark.kafka


async def test_short_and_failed_tasks_get_the_right_outcome(
    kafka_bootstrap: str, topic_factory: TopicFactory
) -> None:
    topics = await make_topics(topic_factory, partitions=1)
    events = [
        # Two known codes and two the API does not know: 2 of 4 expected.
        event(["11X000001", "11X000002", "GHOST-1", "GHOST-2"], scm_data={"batch_number": "S"},
              reference="short"),
        # A pallet key: no expectation unless declared; declared 240, touches 240.
        event("PALLET-0000", key="pallet_sscc", scm_data={"lot": "P"}, reference="pallet",
              expected_codes=240),
        # Declared 20, touches the second pallet's 60 codes: more than expected.
        event("PALLET-0001", key="pallet_sscc", scm_data={"lot": "Q"}, reference="over",
              expected_codes=20),
        event(["11X000003"], scm_data={"batch_number": "F"}, reference="will-fail"),
        event(["11X000004"], scm_data={"batch_number": "OK"}, reference="fine"),
    ]  # fmt: skip
    faults = Faults(fail_reference="will-fail", jitter_s=0)
    async with simulator(faults, codes_per_campaign=300) as sim:
        settings = relay_settings(kafka_bootstrap, sim.base_url, topics)
        await publish(kafka_bootstrap, topics.input, events)
        async with running_relay(settings) as relay:
            await wait_for_commit(kafka_bootstrap, topics, relay)
            outcomes = await results(kafka_bootstrap, topics.results, expected=5)
    by_reference = {o["reference"]: o for o in outcomes}
    short = by_reference["short"]
    assert (short["state"], short["codes_affected"], short["expected_codes"]) == ("complete", 2, 4)
    assert (short["shortfall"], short["short"]) == (2, True)
    pallet = by_reference["pallet"]
    assert (pallet["codes_affected"], pallet["expected_codes"], pallet["short"]) == (
        240,
        240,
        False,
    )
    assert (pallet["excess"], pallet["over"]) == (0, False)
    over = by_reference["over"]
    assert (over["codes_affected"], over["expected_codes"], over["excess"], over["over"]) == (
        60,
        20,
        40,
        True,
    )
    assert over["short"] is False
    failed = by_reference["will-fail"]
    assert (failed["state"], failed["short"], failed["shortfall"]) == ("failed", False, None)
    # "failed: the errors can be interpreted": the API's own view travels with the result.
    assert failed["api_details"]["error"] == "Simulated failure (fail_rate)"
    # One value, shown as a string, as in the vendor's task example.
    assert failed["api_details"]["details"]["constraints"] == {"extended_id": "11X000003"}
    assert by_reference["fine"]["api_details"] is None
    fine = by_reference["fine"]
    assert (fine["state"], fine["shortfall"], fine["short"]) == ("complete", 0, False)
    assert all(o["kind"] == "result" for o in outcomes)
    assert [e["offset"] for e in short["events"]] == [0]
    for outcome in outcomes:
        assert outcome["submitted_at"] <= outcome["published_at"]


async def test_a_stuck_task_is_reported_and_still_followed(
    kafka_bootstrap: str, topic_factory: TopicFactory
) -> None:
    topics = await make_topics(topic_factory, partitions=1)
    async with simulator(Faults(never_finish_rate=1.0)) as sim:
        settings = relay_settings(kafka_bootstrap, sim.base_url, topics, task_stuck_after_s=1.0)
        await publish(kafka_bootstrap, topics.input, [event(["11X000001"], scm_data={"lot": "1"})])
        async with running_relay(settings) as relay:
            await wait_for_commit(kafka_bootstrap, topics, relay)
            (progress,) = await results(kafka_bootstrap, topics.results, expected=1)
            assert (progress["kind"], progress["stuck"], progress["state"]) == (
                "progress",
                True,
                "in-progress",
            )
            polls = sim.account.stats.requests["tasks_bulk"]
            await asyncio.sleep(1.5)
            assert sim.account.stats.requests["tasks_bulk"] > polls, "stopped polling a stuck task"
        # Reported once, and no result: the task never finished.
        assert len(await read_topic(kafka_bootstrap, topics.results, expected=2, timeout_s=2)) == 1


async def test_bulk_polling_asks_for_many_tasks_per_request(
    kafka_bootstrap: str, topic_factory: TopicFactory
) -> None:
    """500 unfinished tasks: one polling round costs ceil(500 / chunk) status requests."""
    topics = await make_topics(topic_factory, partitions=2)
    chunk, tasks = 100, 500
    unlimited = Faults(never_finish_rate=1.0, upload_rate_per_s=100_000)
    events = [event([f"11X{n:06d}"], scm_data={"lot": f"L{n}"}) for n in range(tasks)]
    async with simulator(unlimited, codes_per_campaign=tasks) as sim:
        fast = {
            "upload_rate_per_s": 1000,
            "max_unfinished_tasks": 2000,
            "api_status_chunk_size": chunk,
            "poll_initial_s": 60.0,
            "poll_max_s": 600.0,
        }
        settings = relay_settings(kafka_bootstrap, sim.base_url, topics, **fast)
        await publish(kafka_bootstrap, topics.input, events)
        async with running_relay(settings) as relay:
            await wait_for_commit(kafka_bootstrap, topics, relay)
        assert sim.account.stats.uploads_accepted == tasks
        # A restart rebuilds all 500 from the ledger at once: the first round is due for all.
        before = sim.account.stats.requests["tasks_bulk"]
        restarted = relay_settings(
            kafka_bootstrap,
            sim.base_url,
            topics,
            **{**fast, "poll_initial_s": 1.0, "poll_factor": 10.0},
        )
        async with running_relay(restarted):
            await asyncio.sleep(4.0)
        rounds = sim.account.stats.requests["tasks_bulk"] - before
    assert rounds == math.ceil(tasks / chunk)


async def test_each_task_yields_exactly_one_result_across_kills_and_a_takeover(
    kafka_bootstrap: str, topic_factory: TopicFactory, tmp_path: Path
) -> None:
    topics = await make_topics(topic_factory, partitions=3)
    slow = Faults(pending_delay_s=0.5, progress_delay_s=1.0, jitter_s=0.5)
    events = [
        event([f"11X{n:06d}" for n in range(b * 5, b * 5 + 5)], scm_data={"lot": f"L{b}"})
        for b in range(60)
    ]
    async with simulator(slow, codes_per_campaign=300) as sim:
        base = relay_settings(kafka_bootstrap, sim.base_url, topics, upload_rate_per_s=5)
        log = tmp_path / "relay.log"
        await publish(kafka_bootstrap, topics.input, events)
        await sigkill_while_uploading(base, log, sim, 3, uploads=6)
        first, second = (
            base.model_copy(
                update={"kafka": base.kafka.model_copy(update={"transactional_id": txn_id})}
            )
            for txn_id in (f"{topics.group}-first", f"{topics.group}-second")
        )
        async with relay_process(first, log) as survivor:
            async with relay_process(second, tmp_path / "leaver.log") as leaver:
                # A SIGTERM while it still starts up (a loaded machine) would take nothing
                # over: it leaves once it holds partitions.
                await wait_until(
                    lambda: holds_partitions(tmp_path / "leaver.log"),
                    what="the leaver to get partitions",
                    timeout_s=90,
                    interval_s=0.2,
                )
                await asyncio.sleep(4)
                leaver.send_signal(signal.SIGTERM)
                assert await asyncio.wait_for(leaver.wait(), 60) == 0
            await wait_for_commit(kafka_bootstrap, topics, timeout_s=120)
            # The API's own account of what it created, not the relay's ledger: a task the
            # relay created but never recorded would be missing from both.
            created = set(sim.account.tasks)
            outcomes = await _results_until(kafka_bootstrap, topics.results, created)
            survivor.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(survivor.wait(), 60) == 0
        assert created == set(sim.account.tasks), "a task was created after the input was done"
    recorded = await ledger_task_ids(kafka_bootstrap, topics.tasks)
    counts = Counter(o["task_id"] for o in outcomes if o["kind"] == "result")
    print(
        f"\n{len(created)} tasks created at the API, {len(recorded)} ledger records, "
        f"{sum(counts.values())} results"
    )
    assert sorted(created - set(counts)) == [], "a task the API created has no result"
    assert sorted(set(counts) - created) == [], "a result names a task the API did not create"
    assert sorted(n for n in counts.values() if n != 1) == [], "a task has two results"
    assert sorted(recorded) == sorted(created), "a task created at the API is not recorded once"


async def _results_until(
    bootstrap: str, topic: str, created: set[str], timeout_s: float = 90
) -> list[dict[str, Any]]:

    async def every_result() -> bool:
        records = await read_topic(bootstrap, topic, expected=10**6, timeout_s=2)
        outcomes = [json.loads(r.value) for r in records]
        return {o["task_id"] for o in outcomes if o["kind"] == "result"} >= created

    await wait_until(every_result, what="every task's result", timeout_s=timeout_s, interval_s=0)
    # Give a possible duplicate time to show up before judging.
    await asyncio.sleep(2)
    records = await read_topic(bootstrap, topic, expected=10**6, timeout_s=2)
    return [json.loads(r.value) for r in records]


async def test_the_demo_summarises_what_happened(kafka_bootstrap: str) -> None:
    summary = await run_demo({}, lines=2, codes_per_line=100, bootstrap=kafka_bootstrap)
    # The `status` dead letter, fixed and replayed, makes a fourth complete task.
    assert summary.tasks == {"complete": 4, "failed": 1}
    assert summary.dead_letters == {"campaign_type": 1, "invalid_json": 1, "scm_data_key_status": 1}
    ((short,),) = [summary.short_tasks]
    assert (short["reference"], short["shortfall"]) == ("line-7 relabel", 2)
    assert summary.codes_affected == 203
    assert summary.replayed is not None
    assert summary.replayed["codes_affected"] == 1
    table = summary.table()
    assert "tasks                 5: complete 4, failed 1" in table
    assert f"its task {summary.replayed['task_id']} complete" in table
    assert "line-7 relabel: 2 of 4 codes, 2 missing" in table
    assert summary.metrics_url is not None
    assert f"metrics               {summary.metrics_url}" in table
