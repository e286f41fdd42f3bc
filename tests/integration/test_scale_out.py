"""Three replicas share the account's 10 uploads per second with no setting per replica.

Each replica takes the wall-clock upload slots of the input partitions it owns
(docs/design.md section 12): the simulator, which throttles like the vendor's
API, must answer no 429 while the three drain a backlog together, and every
code is updated once.
"""

from __future__ import annotations

import asyncio
import json
import signal
from contextlib import AsyncExitStack
from pathlib import Path

import pytest

from devkit.harness import TopicFactory, make_topics, relay_process, wait_until
from devkit.simulator.state import Faults
from tests.api_support import simulator
from tests.pipeline_support import event, publish, relay_settings, wait_for_commit

pytestmark = pytest.mark.kafka
STEADY = Faults(pending_delay_s=0.05, progress_delay_s=0.05, jitter_s=0.02)
REPLICAS, PARTITIONS, UPLOADS = 3, 6, 90


def input_shares(log: Path) -> list[list[int]]:
    """The input partitions of each assignment a relay logged."""
    shares = []
    for line in log.read_text().splitlines():
        entry = json.loads(line) if line.startswith("{") else {}
        if entry.get("event") == "rate_share" and entry.get("role") == "input":
            shares.append(entry["partitions"])
    return shares


async def settled_assignment(logs: list[Path], timeout_s: float = 90) -> None:
    """Wait until every replica's last assignment holds its even part of the input."""
    last: list[list[int]] = []

    def even() -> bool:
        nonlocal last
        last = [shares[-1] if (shares := input_shares(log)) else [] for log in logs]
        return sorted(len(owned) for owned in last) == [PARTITIONS // REPLICAS] * REPLICAS

    await wait_until(
        even, what=lambda: f"even assignments: {last}", timeout_s=timeout_s, interval_s=0.2
    )


async def test_three_replicas_share_the_accounts_upload_limit_with_no_429(
    kafka_bootstrap: str, topic_factory: TopicFactory, tmp_path: Path
) -> None:
    topics = await make_topics(topic_factory, partitions=PARTITIONS)
    # One upload per event: each carries its own batch number.
    events = [
        event([f"11S{n:05d}"], scm_data={"batch_number": f"S{n}"}, event_id=f"s{n}")
        for n in range(UPLOADS)
    ]
    async with simulator(STEADY, codes_per_campaign=UPLOADS) as sim:
        logs = [tmp_path / f"relay-{n}.log" for n in range(REPLICAS)]
        async with AsyncExitStack() as stack:
            processes = []
            for n, log in enumerate(logs):
                settings = relay_settings(
                    kafka_bootstrap,
                    sim.base_url,
                    topics,
                    kafka_transactional_id=f"{topics.group}-{n}",
                )
                processes.append(await stack.enter_async_context(relay_process(settings, log)))
            await settled_assignment(logs)
            loop = asyncio.get_running_loop()
            started = loop.time()
            await publish(kafka_bootstrap, topics.input, events)
            await sim.wait_uploads(UPLOADS, timeout_s=120)
            drained = loop.time() - started
            await wait_for_commit(kafka_bootstrap, topics, None, timeout_s=60)
            for process in processes:
                process.send_signal(signal.SIGTERM)
            codes = [await asyncio.wait_for(process.wait(), 60) for process in processes]
        stats = sim.account.stats
        print(
            f"\n{REPLICAS} replicas, {UPLOADS} uploads: drained in {drained:.1f} s "
            f"({drained / (UPLOADS / 10):.2f} x the API's minimum), {stats.throttled} x 429"
        )
        assert codes == [0] * REPLICAS, [log.read_text()[-2000:] for log in logs]
        assert stats.uploads_accepted == UPLOADS
        assert stats.throttled == 0, "the replicas together went over the account's limit"
        assert all(len(shares) >= 1 for shares in map(input_shares, logs))
