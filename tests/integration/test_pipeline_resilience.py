"""Restarts, crashes, a revoked token and a takeover: nothing is lost (guarantees 1 to 3, 7).

The relay runs against the real broker and the simulator, which enforces the
vendor's 10 uploads per second, so each run takes a few seconds and a stop or
a kill lands mid-stream.
"""

from __future__ import annotations

import asyncio
import signal
from collections import Counter
from contextlib import suppress
from pathlib import Path
from typing import Any

import pytest
import structlog

from devkit.harness import TopicFactory, make_topics, relay_process, wait_until
from devkit.simulator.state import Faults
from service import app
from service.http import free_port
from service.relay.supervisor import COMMIT_DEADLINE_S
from tests.api_support import Simulator, simulator
from tests.integration.test_observability import get_json, scrape, value
from tests.pipeline_support import (
    RunningRelay,
    committed_offsets,
    event,
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
STEADY = Faults(pending_delay_s=0.05, progress_delay_s=0.05, jitter_s=0.05)


GROUP = 10  # codes sharing one batch number: they can share one request


def one_code_events(count: int, first: int = 0) -> list[dict[str, Any]]:
    """One event per code; each run of GROUP codes shares a batch number."""
    return [
        event([f"11X{n:06d}"], scm_data={"batch_number": f"B{n // GROUP}"}, event_id=f"ev{n}")
        for n in range(first, first + count)
    ]


def by_code(item: Any) -> bytes:
    return str(item["constraints"]["extended_id"][0]).encode()


async def applied(sim: Simulator, count: int, timeout_s: float = 15) -> Counter[int]:
    """`applications` once every one of `count` codes has been applied at least once (a
    task recorded in the ledger may still be running at the API), or at the timeout."""
    seen: Counter[int] = Counter()

    async def all_applied() -> bool:
        nonlocal seen
        seen = await applications(sim, count)
        return len(seen) >= count

    with suppress(TimeoutError):  # the caller judges what was seen
        await wait_until(all_applied, timeout_s=timeout_s, interval_s=0.1)
    return seen


async def applications(sim: Simulator, count: int, first: int = 0) -> Counter[int]:
    """How many times each code got its batch number."""
    seen: Counter[int] = Counter()
    for n in range(first, first + count):
        _, code = await sim.get(f"/_sim/codes?extended_id=11X{n:06d}")
        for entry in code["history"]:
            assert entry["set"] == {"batch_number": f"B{n // GROUP}"}
            seen[n] += 1
    return seen


async def test_clean_restart_mid_stream_loses_nothing_and_sends_nothing_twice(
    kafka_bootstrap: str, topic_factory: TopicFactory
) -> None:
    topics = await make_topics(topic_factory, partitions=2)
    count = 400
    async with simulator(STEADY, codes_per_campaign=count) as sim:
        # A short shutdown deadline leaves batches unsent, so the restart has work to resume.
        settings = relay_settings(
            kafka_bootstrap, sim.base_url, topics, batch_max_values=10, shutdown_timeout_s=0.5
        )
        await publish(kafka_bootstrap, topics.input, one_code_events(count), key_of=by_code)
        async with running_relay(settings):
            await sim.wait_uploads(8)
        stopped_after = sim.account.stats.uploads_accepted
        async with running_relay(settings) as relay:
            await wait_for_commit(kafka_bootstrap, topics, relay)
        assert stopped_after < sim.account.stats.uploads_accepted, "nothing was left to resume"
        seen = await applications(sim, count)
    assert set(seen) == set(range(count)), "a code was never updated"
    assert max(seen.values()) == 1, "a code was updated twice"
    assert sim.account.stats.upload_values_total == count


async def test_sigkill_mid_stream_loses_nothing(
    kafka_bootstrap: str, topic_factory: TopicFactory, tmp_path: Path
) -> None:
    """Kill -9 the relay process several times while it works, then let it finish."""
    topics = await make_topics(topic_factory, partitions=3)
    count, kills = 600, 3
    async with simulator(STEADY, codes_per_campaign=count) as sim:
        settings = relay_settings(
            kafka_bootstrap, sim.base_url, topics, batch_max_values=10, max_in_flight_requests=2
        )
        await publish(kafka_bootstrap, topics.input, one_code_events(count), key_of=by_code)
        log = tmp_path / "relay.log"
        await sigkill_while_uploading(settings, log, sim, kills)
        async with relay_process(settings, log) as process:
            await wait_for_commit(kafka_bootstrap, topics, timeout_s=120)
            process.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(process.wait(), 60) == 0, log.read_text()[-3000:]
        seen = await applications(sim, count)
        created = list(sim.account.tasks)
    recorded = await ledger_task_ids(kafka_bootstrap, topics.tasks)
    twice = sorted(n for n, times in seen.items() if times > 1)
    print(
        f"\n{kills} kills: {len(created)} tasks created, {len(recorded)} ledger records "
        f"({len(set(recorded))} tasks), {len(set(created) - set(recorded))} created but never "
        f"recorded, {len(twice)} of {count} codes updated twice"
    )
    assert set(seen) == set(range(count)), "a code was never updated"
    # Exactly once across SIGKILLs: every task the API created is in the ledger once (an
    # unrecorded one would be resent), and no code got its change twice.
    assert sorted(recorded) == sorted(created), "a task created at the API is not recorded once"
    assert twice == [], f"{len(twice)} codes updated twice, e.g. {twice[:5]}"


async def test_revoked_token_stops_intake_without_dead_letters_until_fixed(
    kafka_bootstrap: str, topic_factory: TopicFactory
) -> None:
    topics = await make_topics(topic_factory, partitions=1)
    port = free_port()
    async with simulator(STEADY, codes_per_campaign=100) as sim:
        settings = relay_settings(
            kafka_bootstrap, sim.base_url, topics, http_port=port, api_retry_max_backoff_s=0.5
        )
        await publish(kafka_bootstrap, topics.input, one_code_events(10), key_of=by_code)
        async with running_relay(settings) as relay:
            await wait_for_commit(kafka_bootstrap, topics, relay)
            await sim.set_faults(forbidden=True)
            await publish(
                kafka_bootstrap, topics.input, one_code_events(10, first=10), key_of=by_code
            )
            await asyncio.sleep(3)
            relay.check_alive()
            status, body = await get_json(port, "/readyz")
            assert (status, body["reasons"]) == (503, ["API authentication failed (403)"])
            assert value(await scrape(port), "scm_relay_api_auth_failed") == 1
            assert sum((await applications(sim, 10, first=10)).values()) == 0
            # The permission granted back: the relay resumes by itself, no restart.
            await sim.set_faults(forbidden=False)
            await wait_for_commit(kafka_bootstrap, topics, relay)
            # Ready again once the status polls are accepted too (their next round).
            for _ in range(100):
                if (ready := await get_json(port, "/readyz")) == (200, {"ready": True}):
                    break
                await asyncio.sleep(0.1)
            assert ready == (200, {"ready": True})
            # Committed means recorded: the last task may still be running at the API.
            seen = await applied(sim, 20)
        assert sim.account.stats.statuses["4xx"] >= 1
    assert dict(seen) == dict.fromkeys(range(20), 1)
    assert await read_topic(kafka_bootstrap, topics.dlq, expected=1, timeout_s=2) == []


async def test_a_wrong_base_url_dead_letters_nothing_and_says_so(
    kafka_bootstrap: str, topic_factory: TopicFactory
) -> None:
    topics = await make_topics(topic_factory, partitions=1)
    port = free_port()
    async with simulator(STEADY, codes_per_campaign=100) as sim:
        await publish(kafka_bootstrap, topics.input, one_code_events(20), key_of=by_code)
        wrong = relay_settings(
            kafka_bootstrap, f"{sim.base_url}/scantrust/", topics, http_port=port
        )
        with structlog.testing.capture_logs() as logs:
            async with running_relay(wrong) as relay:
                await asyncio.sleep(4)
                relay.check_alive()
                status, body = await get_json(port, "/readyz")
                samples = await scrape(port)
        assert status == 503
        assert body["reasons"] == ["API refuses the relay's requests (404): check the base URL"]
        assert value(samples, "scm_relay_api_misconfigured") == 1
        assert value(samples, "scm_relay_events_consumed_total") == 0, "read before the check"
        assert any(entry["event"] == "api_misconfigured_intake_stopped" for entry in logs)
        assert sim.account.stats.uploads_accepted == 0
        # Nothing accounted: at most the start, re-committed to fence a transaction.
        assert (await committed_offsets(kafka_bootstrap, topics.group, topics.input))[0] in (
            None,
            0,
        )
        right = relay_settings(kafka_bootstrap, sim.base_url, topics)
        async with running_relay(right) as relay:
            await wait_for_commit(kafka_bootstrap, topics, relay)
            seen = await applied(sim, 20)
    assert dict(seen) == dict.fromkeys(range(20), 1)
    assert await read_topic(kafka_bootstrap, topics.dlq, expected=1, timeout_s=2) == [], (
        "a wrong base URL dead-lettered good events"
    )


async def test_a_long_outage_keeps_the_relay_in_its_group_and_loses_nothing(
    kafka_bootstrap: str, topic_factory: TopicFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The outage outlasts max.poll.interval.ms (shortened here from 60 s): a relay whose
    # upload queue is full must keep polling, or Kafka takes its partitions away.
    monkeypatch.setattr(app, "MAX_POLL_INTERVAL_MS", 4000)
    topics = await make_topics(topic_factory, partitions=2)
    async with simulator(STEADY, codes_per_campaign=400) as sim:
        settings = relay_settings(
            kafka_bootstrap,
            sim.base_url,
            topics,
            batch_max_values=5,
            max_in_flight_requests=1,
            api_breaker_cooldown_s=0.5,
        )
        with structlog.testing.capture_logs() as logs:
            async with running_relay(settings) as relay:
                await sim.set_faults(error_rate=1.0)
                await publish(kafka_bootstrap, topics.input, one_code_events(200), key_of=by_code)
                await asyncio.sleep(10)
                relay.check_alive()
                assert any(
                    entry["event"] == "intake_paused" and "uploads queued" in entry["reason"]
                    for entry in logs
                )
                await sim.set_faults(error_rate=0.0)
                await wait_for_commit(kafka_bootstrap, topics, relay, timeout_s=120)
                # Leaving the group shows when the consumer next polls: after the outage.
                events = [entry["event"] for entry in logs]
                assert "partitions_revoked" not in events, f"the relay left its group: {logs}"
        seen = await applications(sim, 200)
    assert sorted(seen) == list(range(200)), "every code got its change"


async def test_a_second_relay_takes_over_when_the_first_stops(
    kafka_bootstrap: str, topic_factory: TopicFactory
) -> None:
    topics = await make_topics(topic_factory, partitions=4)
    count = 1000
    async with simulator(STEADY, codes_per_campaign=count) as sim:
        base = {"batch_max_values": 10}
        first = relay_settings(
            kafka_bootstrap,
            sim.base_url,
            topics,
            kafka_transactional_id=f"{topics.group}-a",
            **base,
        )
        second = relay_settings(
            kafka_bootstrap,
            sim.base_url,
            topics,
            kafka_transactional_id=f"{topics.group}-b",
            **base,
        )
        await publish(kafka_bootstrap, topics.input, one_code_events(count), key_of=by_code)
        async with running_relay(second) as survivor:
            async with running_relay(first):
                await sim.wait_uploads(10)
            at_stop = sim.account.stats.uploads_accepted
            await wait_for_commit(kafka_bootstrap, topics, survivor, timeout_s=120)
            assert at_stop < sim.account.stats.uploads_accepted, "nothing was left to take over"
        seen = await applications(sim, count)
    assert set(seen) == set(range(count)), "a code was never updated"
    assert max(seen.values()) == 1, "a code was updated twice"


async def stop_and_time(relay: Any) -> float:
    """Set the relay's stop event; return how long it took to exit (cleanly)."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    relay.stop.set()
    code = await asyncio.wait_for(relay.task, timeout=180)
    assert code == 0, f"the relay exited with {code}"
    return loop.time() - started


async def test_a_stop_while_status_polls_retry_against_a_failing_api_keeps_its_deadline(
    kafka_bootstrap: str, topic_factory: TopicFactory
) -> None:
    topics = await make_topics(topic_factory, partitions=1)
    slow_tasks = Faults(pending_delay_s=3.0, progress_delay_s=0.05)
    async with simulator(slow_tasks, codes_per_campaign=100) as sim:
        # A status poll may retry for two minutes: longer than the whole shutdown bound.
        settings = relay_settings(
            kafka_bootstrap,
            sim.base_url,
            topics,
            api_retry_max_elapsed_s=120.0,
            api_breaker_failures=1000,
            shutdown_timeout_s=5.0,
            api_request_timeout_s=5.0,
        )
        await publish(kafka_bootstrap, topics.input, one_code_events(20), key_of=by_code)
        stop = asyncio.Event()
        relay = RunningRelay(stop, asyncio.create_task(app.run_relay(settings, stop)))
        await wait_for_commit(kafka_bootstrap, topics, relay)
        await sim.set_faults(error_rate=1.0)
        statuses_before = sim.account.stats.statuses["5xx"]
        await asyncio.sleep(1.5)
        assert sim.account.stats.statuses["5xx"] > statuses_before, "no status poll failed"
        elapsed = await stop_and_time(relay)
        bound = (
            settings.batching.shutdown_timeout_s
            + settings.api.request_timeout_s
            + COMMIT_DEADLINE_S
        )
        print(f"stopped while status polls retried: exited in {elapsed:.1f} s")
        assert elapsed < bound, f"the shutdown took {elapsed:.1f} s, over its {bound} s bound"
        tasks = await ledger_task_ids(kafka_bootstrap, topics.tasks)
        await sim.set_faults(error_rate=0.0)
        async with running_relay(settings):
            outcomes = await results(kafka_bootstrap, topics.results, expected=len(tasks))
        seen = await applications(sim, 20)
    assert sorted(outcome["task_id"] for outcome in outcomes) == sorted(tasks)
    assert dict(seen) == dict.fromkeys(range(20), 1), "a code was lost or updated twice"


async def test_a_stop_while_uploads_are_parked_after_a_403_is_not_held_up(
    kafka_bootstrap: str, topic_factory: TopicFactory
) -> None:
    topics = await make_topics(topic_factory, partitions=1)
    async with simulator(STEADY, codes_per_campaign=100) as sim:
        settings = relay_settings(
            kafka_bootstrap, sim.base_url, topics, shutdown_timeout_s=30.0, batch_max_values=5
        )
        await sim.set_faults(forbidden=True)
        await publish(kafka_bootstrap, topics.input, one_code_events(20), key_of=by_code)
        stop = asyncio.Event()
        relay = RunningRelay(stop, asyncio.create_task(app.run_relay(settings, stop)))

        def called() -> bool:
            relay.check_alive()
            return sim.account.stats.statuses["4xx"] > 0

        await wait_until(called, what="the API to be called", timeout_s=30, interval_s=0.1)
        await asyncio.sleep(0.5)
        elapsed = await stop_and_time(relay)
        print(f"stopped while uploads were parked after a 403: exited in {elapsed:.1f} s")
        # Parked uploads end when the shutdown starts: they do not wait for its deadline.
        assert elapsed < 5.0, f"parked uploads held the shutdown for {elapsed:.1f} s"
        assert sim.account.stats.uploads_accepted == 0
        await sim.set_faults(forbidden=False)
        async with running_relay(settings) as running:
            await wait_for_commit(kafka_bootstrap, topics, running)
            seen = await applied(sim, 20)
    assert dict(seen) == dict.fromkeys(range(20), 1), "a code was lost or updated twice"
    assert await read_topic(kafka_bootstrap, topics.dlq, expected=1, timeout_s=2) == []
