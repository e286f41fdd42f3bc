"""Exactly-once effect at the API when answers are lost (issue: write-ahead intents).

Lost answers and 5xx answers after the task was created: the relay looks each
ambiguous upload up by reference instead of resending it blindly, so every task
the simulator created is in the ledger once, gets one result, and no code is
updated twice. The relay runs against the real broker and the simulator.
"""

from __future__ import annotations

import asyncio
import json
import signal
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from devkit.harness import TopicFactory, Topics, make_topics, relay_process, wait_until
from devkit.simulator.state import Faults
from tests.api_support import Simulator, simulator
from tests.integration.test_pipeline_resilience import (
    STEADY,
    applications,
    applied,
    by_code,
    one_code_events,
)
from tests.pipeline_support import (
    event,
    holds_partitions,
    ledger_task_ids,
    open_intents,
    publish,
    read_topic,
    relay_settings,
    results,
    running_relay,
    sigkill_while_uploading,
    wait_for_commit,
)

pytestmark = pytest.mark.kafka

# 20 % of upload answers dropped after the task was created, 15 % answered 502 after it
# (high enough that 30 uploads see both).
LOST_ANSWERS_AND_5XX = Faults(
    pending_delay_s=0.05,
    progress_delay_s=0.05,
    jitter_s=0.05,
    drop_response_rate=0.2,
    error_after_create_rate=0.15,
)


async def test_lost_answers_and_5xx_after_creating_a_task_update_no_code_twice(
    kafka_bootstrap: str, topic_factory: TopicFactory
) -> None:
    topics = await make_topics(topic_factory, partitions=2)
    count = 300
    async with simulator(LOST_ANSWERS_AND_5XX, codes_per_campaign=count) as sim:
        # And two answers hang past the relay's 2 s timeout (their tasks exist): chosen by
        # number, not by the fault dice, whose draws depend on timing.
        created_so_far: Counter[str] = Counter()
        hung: list[int] = []

        async def hang_some(moment: str) -> None:
            created_so_far[moment] += 1
            if moment == "created" and created_so_far[moment] in (2, 5):
                hung.append(created_so_far[moment])
                await asyncio.sleep(3)

        sim.account.upload_hook = hang_some
        settings = relay_settings(
            kafka_bootstrap,
            sim.base_url,
            topics,
            batch_max_values=10,
            api_request_timeout_s=2.0,
            api_breaker_failures=1000,
        )
        await publish(kafka_bootstrap, topics.input, one_code_events(count), key_of=by_code)
        async with running_relay(settings) as relay:
            await wait_for_commit(kafka_bootstrap, topics, relay, timeout_s=240)
            created = set(sim.account.tasks)
            outcomes = await results(kafka_bootstrap, topics.results, expected=len(created))
        recorded = await ledger_task_ids(kafka_bootstrap, topics.tasks)
        seen = await applications(sim, count)
        stats = sim.account.stats
    print(
        f"\n{stats.responses_dropped} answers dropped, {len(hung)} hung, "
        f"{stats.errors_after_create} 502s after creating: {len(created)} tasks created, "
        f"{len(recorded)} recorded, {len(outcomes)} results"
    )
    assert stats.responses_dropped > 0, "no answer was lost"
    assert stats.errors_after_create > 0, "no 5xx came after a task was created"
    assert hung == [2, 5], "no answer hung"
    assert sorted(recorded) == sorted(created), "a task created at the API is not recorded once"
    finished = [o["task_id"] for o in outcomes if o.get("kind", "result") == "result"]
    assert sorted(finished) == sorted(created), "a task did not get exactly one result"
    assert dict(seen) == dict.fromkeys(range(count), 1), "a code was lost or updated twice"


# -- crashes, takeovers and paused replicas (write-ahead intents and fencing) ------------

CRASH_POINTS = {
    # The request reached the API, which has not created the task yet.
    "before_the_task_exists": ("received", 1),
    # The API created the task; its answer never leaves (the relay is gone).
    "task_created_answer_lost": ("created", 1),
    # The first task is recorded (one uploader takes the next batch only then), its
    # result not yet published.
    "after_the_record": ("received", 2),
}


async def everything_settled(
    bootstrap: str, topics: Topics, sim: Simulator, timeout_s: float = 120
) -> list[dict[str, Any]]:
    """Wait until the input is committed to its end, no intent is open and every task the
    simulator created has a result; returns the results."""
    await wait_for_commit(bootstrap, topics, timeout_s=timeout_s)

    async def all_closed() -> bool:
        return not await open_intents(bootstrap, topics.tasks)

    await wait_until(all_closed, what="every intent to close", timeout_s=timeout_s, interval_s=0.5)
    outcomes = await results(bootstrap, topics.results, expected=len(sim.account.tasks))
    return [o for o in outcomes if o.get("kind", "result") == "result"]


def assert_exactly_once(
    created: set[str], recorded: list[str], finished: list[dict[str, Any]], seen: Counter[int]
) -> None:
    assert sorted(recorded) == sorted(created), "a task created at the API is not recorded once"
    assert sorted(o["task_id"] for o in finished) == sorted(created), (
        "a task did not get exactly one result"
    )
    twice = sorted(n for n, times in seen.items() if times > 1)
    assert twice == [], f"{len(twice)} codes updated twice"


@pytest.mark.parametrize("point", sorted(CRASH_POINTS))
async def test_a_crash_at_each_step_loses_nothing_and_sends_nothing_twice(
    point: str, kafka_bootstrap: str, topic_factory: TopicFactory, tmp_path: Path
) -> None:
    moment, upload = CRASH_POINTS[point]
    topics = await make_topics(topic_factory, partitions=2)
    count = 40
    async with simulator(STEADY, codes_per_campaign=count) as sim:
        settings = relay_settings(
            kafka_bootstrap,
            sim.base_url,
            topics,
            batch_max_values=10,
            max_in_flight_requests=1,
            api_request_timeout_s=2.0,
        )
        await publish(kafka_bootstrap, topics.input, one_code_events(count), key_of=by_code)
        log = tmp_path / "relay.log"
        async with relay_process(settings, log) as victim:
            seen_moments: Counter[str] = Counter()
            killed = asyncio.Event()

            async def crash(at: str) -> None:
                seen_moments[at] += 1
                if at == moment and seen_moments[at] == upload and not killed.is_set():
                    victim.send_signal(signal.SIGKILL)
                    await victim.wait()
                    killed.set()

            sim.account.upload_hook = crash
            await asyncio.wait_for(killed.wait(), 60)
            sim.account.upload_hook = None
        async with relay_process(settings, log) as survivor:
            finished = await everything_settled(kafka_bootstrap, topics, sim)
            survivor.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(survivor.wait(), 60) == 0, log.read_text()[-3000:]
        created = set(sim.account.tasks)
        seen = await applied(sim, count)
    recorded = await ledger_task_ids(kafka_bootstrap, topics.tasks)
    resolved = log.read_text().count('"intent_resolved"')
    print(f"\n{point}: {len(created)} tasks created, {resolved} intents resolved after the crash")
    assert set(seen) == set(range(count)), "a code was never updated"
    assert_exactly_once(created, recorded, finished, seen)
    assert resolved >= 1, "the crash left no intent open: the test did not test intents"


@pytest.mark.timeout(300)
async def test_sigkills_with_lost_answers_and_5xx_update_no_code_twice(
    kafka_bootstrap: str, topic_factory: TopicFactory, tmp_path: Path
) -> None:
    topics = await make_topics(topic_factory, partitions=2)
    count, kills = 600, 3
    async with simulator(LOST_ANSWERS_AND_5XX, codes_per_campaign=count) as sim:
        settings = relay_settings(
            kafka_bootstrap,
            sim.base_url,
            topics,
            batch_max_values=10,
            max_in_flight_requests=2,
            api_request_timeout_s=2.0,
            api_breaker_failures=1000,
        )
        await publish(kafka_bootstrap, topics.input, one_code_events(count), key_of=by_code)
        log = tmp_path / "relay.log"
        await sigkill_while_uploading(settings, log, sim, kills, timeout_s=90)
        async with relay_process(settings, log) as process:
            finished = await everything_settled(kafka_bootstrap, topics, sim, timeout_s=240)
            process.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(process.wait(), 60) == 0, log.read_text()[-3000:]
        created = set(sim.account.tasks)
        seen = await applied(sim, count)
        stats = sim.account.stats
    recorded = await ledger_task_ids(kafka_bootstrap, topics.tasks)
    resolved = log.read_text().count('"intent_resolved"')
    print(
        f"\n{kills} SIGKILLs, {stats.responses_dropped} answers dropped, "
        f"{stats.errors_after_create} 5xx after creating: {len(created)} tasks created, "
        f"{len(set(recorded))} recorded, {len(finished)} results, "
        f"{sum(1 for t in seen.values() if t > 1)} codes updated twice, "
        f"{resolved} intents resolved after a crash"
    )
    assert stats.responses_dropped > 0
    assert stats.errors_after_create > 0
    assert set(seen) == set(range(count)), "a code was never updated"
    assert_exactly_once(created, recorded, finished, seen)


@dataclass(frozen=True)
class AfterResume:
    """What a paused replica's first incarnation did once it was running again: its log
    from the resume to its restart (its second incarnation is a new member, and fine)."""

    lines: list[dict[str, Any]]
    restarted: bool
    held: bool  # it held input partitions when it was paused

    def count(self, event: str) -> int:
        return sum(1 for line in self.lines if line.get("event") == event)

    @property
    def fenced(self) -> bool:
        """It learnt that its partitions were gone: a transaction refused, or its
        batches given up to their new owner."""
        return self.count("relay_fenced") + self.count("batch_abandoned") > 0

    def uploads_after(self, resumed: datetime, created_at: dict[str, str]) -> list[str]:
        """Tasks it reported accepted that the API created after the resume (an answer to
        a request sent before the pause is not one)."""
        return [
            line["task_id"]
            for line in self.lines
            if line.get("event") == "batch_submitted"
            and line["task_id"] in created_at
            and datetime.fromisoformat(created_at[line["task_id"]]) >= resumed
        ]

    def problems(self, resumed: datetime, created_at: dict[str, str]) -> list[str]:
        """Why the first incarnation is not known to have written nothing after the
        resume (empty when it is)."""
        found = []
        if not self.held:
            found.append("it held no partitions when paused: the pause tested nothing")
        if not self.fenced:
            found.append("its log shows no fenced transaction and no batch given up")
        if not self.restarted:
            found.append("it never restarted as a new incarnation (still a member?)")
        if committed := self.count("offsets_committed"):
            found.append(f"it committed input offsets {committed} time(s)")
        if uploaded := self.uploads_after(resumed, created_at):
            found.append(f"it uploaded {len(uploaded)} batch(es), e.g. {uploaded[:3]}")
        return found


def after_resume(log: Path, resumed: datetime) -> AfterResume:
    """The paused replica's JSON log lines stamped from `resumed` (nothing is stamped
    while a process is stopped) to its first `relay_restarting_fenced`, inclusive. The
    replica must log at DEBUG: `offsets_committed` shows each commit that moved offsets."""
    lines: list[dict[str, Any]] = []
    held = False
    for text in log.read_text().splitlines():
        if not text.startswith("{"):
            continue  # aiokafka's own lines
        line = json.loads(text)
        if datetime.fromisoformat(line["timestamp"]) < resumed:
            if line.get("event") in ("partitions_assigned", "partitions_revoked"):
                held = line["event"] == "partitions_assigned" and bool(line["partitions"])
            continue
        lines.append(line)
        if line.get("event") == "relay_restarting_fenced":
            return AfterResume(lines, restarted=True, held=held)
    return AfterResume(lines, restarted=False, held=held)


def a_b_a_events(first: int, count: int) -> list[list[dict[str, Any]]]:
    """Three rounds of events over `count` codes: batch number A, then B, then A."""
    return [
        [
            event([f"11X{n:06d}"], scm_data={"batch_number": value}, event_id=f"{value}{step}-{n}")
            for n in range(first, first + count)
        ]
        for step, value in enumerate(("A", "B", "A"))
    ]


async def histories(sim: Simulator, first: int, count: int) -> dict[int, list[str]]:
    """The batch numbers each code was given, in the order the API applied them."""
    seen = {}
    for n in range(first, first + count):
        _, code = await sim.get(f"/_sim/codes?extended_id=11X{n:06d}")
        seen[n] = [entry["set"]["batch_number"] for entry in code["history"]]
    return seen


@pytest.mark.timeout(420)
async def test_a_paused_replica_neither_uploads_nor_commits_after_its_partitions_moved(
    kafka_bootstrap: str, topic_factory: TopicFactory, tmp_path: Path
) -> None:
    topics = await make_topics(topic_factory, partitions=4)
    count, sequences, invalid = 1500, 50, 10
    async with simulator(STEADY, codes_per_campaign=count + sequences) as sim:
        # The replicas share 5 uploads per second between them: a 150-request backlog
        # keeps the paused one's batches open and its uploads in flight.
        base = {"batch_max_values": 10, "upload_rate_per_s": 5, "api_request_timeout_s": 2.0}
        first, second = (
            relay_settings(
                kafka_bootstrap,
                sim.base_url,
                topics,
                kafka_transactional_id=f"{topics.group}-{name}",
                # The paused one at DEBUG: its log shows every commit that moved offsets.
                log_level=level,
                **base,
            )
            for name, level in (("a", "DEBUG"), ("b", "INFO"))
        )
        a, b, a_again = a_b_a_events(count, sequences)
        backlog: list[Any] = [*a, *one_code_events(count), *b, *a_again]
        await publish(kafka_bootstrap, topics.input, backlog, key_of=by_code)
        await publish(kafka_bootstrap, topics.input, [b"{not json"] * invalid)
        log_a, log_b = tmp_path / "a.log", tmp_path / "b.log"
        async with relay_process(first, log_a) as paused, relay_process(second, log_b) as other:
            await sim.wait_uploads(20, timeout_s=90)
            # Paused while it holds partitions (it may still be starting on a busy machine).
            await wait_until(
                lambda: holds_partitions(log_a) and holds_partitions(log_b),
                what="both replicas to join",
                timeout_s=90,
                interval_s=0.2,
            )
            paused.send_signal(signal.SIGSTOP)
            at_pause = sim.account.stats.uploads_accepted
            await asyncio.sleep(30)
            resumed = datetime.now(UTC)
            paused.send_signal(signal.SIGCONT)
            finished = await everything_settled(kafka_bootstrap, topics, sim, timeout_s=240)
            # Fenced, the paused replica started a fresh incarnation that rejoined the group.
            for process, log in ((paused, log_a), (other, log_b)):
                process.send_signal(signal.SIGTERM)
                assert await asyncio.wait_for(process.wait(), 60) == 0, log.read_text()[-3000:]
        created = set(sim.account.tasks)
        created_at = {task.id: task.created_at for task in sim.account.tasks.values()}
        seen = await applied(sim, count)
        orders = await histories(sim, count, sequences)
        # One more than expected: a dead letter written twice shows up.
        dead = await read_topic(kafka_bootstrap, topics.dlq, invalid + 1, timeout_s=5)
    recorded = await ledger_task_ids(kafka_bootstrap, topics.tasks)
    zombie = after_resume(log_a, resumed)
    fenced, restarted = zombie.count("relay_fenced"), zombie.count("relay_restarting_fenced")
    resolved = log_b.read_text().count('"intent_resolved"')
    wrong = sorted(n for n, history in orders.items() if history != ["A", "B", "A"])
    print(
        f"\npaused at {at_pause} uploads; the paused replica had {fenced} fenced transaction "
        f"and restarted {restarted} time(s); {resolved} of its intents resolved by the other; "
        f"{len(created)} tasks created, {len(set(recorded))} recorded, {len(finished)} results; "
        f"{sum(1 for t in seen.values() if t > 1)} codes updated twice; "
        f"{len(wrong)} of {sequences} A, B, A codes out of order; {len(dead)} dead letters"
    )
    assert zombie.problems(resumed, created_at) == [], "the paused replica went on"
    assert set(seen) == set(range(count)), "a code was never updated"
    assert_exactly_once(created, recorded, finished, seen)
    assert wrong == [], f"A, B, A not kept: {[orders[n] for n in wrong[:5]]}"
    positions = {
        (dict(r.headers)["scm_relay.source.partition"], dict(r.headers)["scm_relay.source.offset"])
        for r in dead
    }
    assert len(dead) == invalid, "a dead letter was written twice (or lost)"
    assert len(set(positions)) == invalid
