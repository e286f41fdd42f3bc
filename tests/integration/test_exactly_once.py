"""Exactly-once effect at the API when answers are lost (issue: write-ahead intents).

Lost answers and 5xx answers after the task was created: the relay looks each
ambiguous upload up by reference instead of resending it blindly, so every task
the simulator created is in the ledger once, gets one result, and no code is
updated twice. The relay runs against the real broker and the simulator.
"""

from __future__ import annotations

import pytest

from service.simulator.state import Faults
from tests.api_support import simulator
from tests.integration.test_pipeline_resilience import applications, by_code, one_code_events
from tests.kafka_support import TopicFactory
from tests.pipeline_support import (
    ledger_task_ids,
    make_topics,
    publish,
    relay_settings,
    results,
    running_relay,
    wait_for_commit,
)

pytestmark = pytest.mark.kafka


async def test_lost_answers_and_5xx_after_creating_a_task_update_no_code_twice(
    kafka_bootstrap: str, topic_factory: TopicFactory
) -> None:
    topics = await make_topics(topic_factory, partitions=2)
    count = 300
    faults = Faults(
        pending_delay_s=0.05,
        progress_delay_s=0.05,
        jitter_s=0.05,
        drop_response_rate=0.2,
        error_after_create_rate=0.1,
    )
    async with simulator(faults, codes_per_campaign=count) as sim:
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
    assert stats.responses_dropped > 0, "no answer was lost"
    assert stats.errors_after_create > 0, "no 5xx came after a task was created"
    assert sorted(recorded) == sorted(created), "a task created at the API is not recorded once"
    finished = [o["task_id"] for o in outcomes if o.get("kind", "result") == "result"]
    assert sorted(finished) == sorted(created), "a task did not get exactly one result"
    assert dict(seen) == dict.fromkeys(range(count), 1), "a code was lost or updated twice"
