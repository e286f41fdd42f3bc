"""Figures 1 and 2: throughput against the limit of any Python consumer, and request fill.

In one run, on one topic of N change events (a few dozen scm_data groups, one code
per event, some pallets of up to 20 codes):

  (a) a bare aiokafka consumer reads the topic;
  (j) the same, plus `json.loads` of each record: the floor of any consumer that
      reads the events at all;
  (b) the same, plus `parse_event` (the event contract: its compiled pydantic-core
      schema, and its validators for what that leaves) of each record;
  (c) the relay end to end, as its own process, against the simulator answering at
      once with its rate limits lifted: events per second from its first fetch to
      its last offset committed.

Printed: c/j, figure 1's main ratio (target >= 0.25), b/j (target >= 0.7), c/a and
c/b; then, counted at the simulator in run
(c), the mean values per upload request (target >= 990) and the status requests
per finished task (target <= 0.05).

    python -m bench.throughput [--events 500000] [--profile relay-profile.txt]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer

from bench.common import (
    INSTANT_API,
    REPO,
    best_fill,
    create_topics,
    first_fetch_to_last_commit,
    kafka,
    make_events,
    produce,
    rate,
    relay_process,
    say,
    simulator,
)
from devkit.harness import Topics, wait_until
from service.core.parsing import parse_event

STATUS_ROUTES = ("task", "tasks_bulk", "task_list", "task_group")


async def bare_consumer(
    bootstrap: str, topic: str, expected: int, *, work: Callable[[bytes], object] | None = None
) -> float:
    """Events per second of one consumer reading `topic` from its first record to its last,
    calling `work` on each record's value."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_committed",
    )
    await consumer.start()
    try:
        seen = 0
        first = 0.0
        while seen < expected:
            batches = await consumer.getmany(timeout_ms=1000, max_records=2000)
            for records in batches.values():
                if records and not first:
                    first = time.monotonic()
                if work is not None:
                    for record in records:
                        work(record.value)
                seen += len(records)
        return rate(seen, time.monotonic() - first)
    finally:
        await consumer.stop()


async def relay_end_to_end(
    bootstrap: str, topics: Topics, events: int, profile: Path | None
) -> dict[str, Any]:
    """Run (c); returns the rate and the simulator's counts."""
    async with (
        simulator(INSTANT_API) as (api_url, account),
        relay_process(
            bootstrap,
            api_url,
            topics,
            REPO / "bench" / ".logs",
            profile=profile,
            upload_rate_per_s=1000,
            api_rate_per_min=1_000_000,
            max_in_flight_requests=8,
        ) as relay,
    ):
        span = await first_fetch_to_last_commit(
            relay, bootstrap, topics, timeout_s=1800, every_s=0.1
        )

        async def all_finished() -> bool:
            relay.check_alive()
            metrics = await relay.metrics()
            return (
                metrics.get("scm_relay_tasks_finished_total", 0) >= account.stats.uploads_accepted
            )

        await wait_until(all_finished, timeout_s=300, interval_s=0.2, what="every task finished")
        finished = (await relay.metrics()).get("scm_relay_tasks_finished_total", 0)
    stats = account.stats
    status_requests = sum(stats.requests[route] for route in STATUS_ROUTES)
    return {
        "events_per_s": rate(events, span.seconds),
        "seconds": span.seconds,
        "cpu_seconds": span.cpu_seconds,
        "uploads": stats.uploads_accepted,
        "values_per_upload": rate(stats.upload_values_total, stats.uploads_accepted),
        "status_requests": status_requests,
        "tasks_finished": finished,
        "status_requests_per_task": rate(status_requests, finished),
        "throttled": stats.throttled,
    }


async def run(events: int, partitions: int = 3, profile: Path | None = None) -> dict[str, Any]:
    async with kafka() as bootstrap:
        topics = await create_topics(bootstrap, partitions)
        say(f"throughput: producing {events} events")
        await produce(bootstrap, topics.input, make_events(events))
        say("throughput: (a) bare consumer")
        bare = await bare_consumer(bootstrap, topics.input, events)
        say("throughput: (j) consumer + json.loads")
        decoding = await bare_consumer(bootstrap, topics.input, events, work=json.loads)
        say("throughput: (b) consumer + parse_event")
        validating = await bare_consumer(bootstrap, topics.input, events, work=parse_event)
        say("throughput: (c) the relay end to end")
        relay = await relay_end_to_end(bootstrap, topics, events, profile)
    fewest_uploads, best_values_per_upload = best_fill(make_events(events))
    return {
        "events": events,
        "fewest_uploads": fewest_uploads,
        "best_values_per_upload": best_values_per_upload,
        "bare_per_s": bare,
        "decoding_per_s": decoding,
        "validating_per_s": validating,
        # Figure 1's main ratio: the relay against the floor of any validating consumer.
        "c_over_j": relay["events_per_s"] / decoding,
        "b_over_j": validating / decoding,
        "relay": relay,
        "c_over_a": relay["events_per_s"] / bare,
        "c_over_b": relay["events_per_s"] / validating,
    }


def report(result: dict[str, Any]) -> str:
    relay = result["relay"]
    return "\n".join(
        [
            f"events: {result['events']}",
            f"(a) bare aiokafka consumer:           {result['bare_per_s']:10.0f} events/s",
            f"(j) consumer + json.loads:            {result['decoding_per_s']:10.0f} events/s",
            f"(b) consumer + parse_event:           {result['validating_per_s']:10.0f} events/s",
            f"(c) relay, first fetch to last commit: {relay['events_per_s']:9.0f} events/s "
            f"({relay['seconds']:.1f} s, relay CPU {relay['cpu_seconds']:.1f} s)",
            f"values per upload request: {relay['values_per_upload']:.1f} "
            f"({relay['uploads']} uploads; target >= 990; this input's best: "
            f"{result['best_values_per_upload']:.1f} in {result['fewest_uploads']} uploads, as "
            "every scm_data group ends with one part-filled request)",
            f"status requests per finished task: {relay['status_requests_per_task']:.3f} "
            f"({relay['status_requests']} for {relay['tasks_finished']:.0f}; target <= 0.05)",
            f"c/j = {result['c_over_j']:.3f} (relay / (consume + json.loads); target >= 0.25)",
            f"b/j = {result['b_over_j']:.2f} (parse_event / json.loads; target >= 0.7)",
            f"c/a = {result['c_over_a']:.2f}",
            f"c/b = {result['c_over_b']:.2f}",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=500_000)
    parser.add_argument("--partitions", type=int, default=3)
    parser.add_argument(
        "--profile", type=Path, help="profile the relay with pyinstrument into FILE"
    )
    args = parser.parse_args(argv)
    result = asyncio.run(run(args.events, args.partitions, args.profile))
    print(report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
