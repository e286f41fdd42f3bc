"""Three replicas draining one backlog at the account's limit, sharing it.

The backlog of `bench.drain` (default 200 000 values) waits in an input topic of 6
partitions; three relays of one consumer group start together against the
simulator with the real limits (10 uploads per second, 3000 requests per minute
per account). No setting divides the limit: each replica takes the upload slots
of the partitions it owns (docs/design.md section 12). Drain time is measured from
the first fetch of any replica to the last offset committed; the minimum is
V / (10 x 1000) seconds. Target (the chaos issue): zero 429 and <= 1.15 x minimum.

    python -m bench.scale_out [--values 200000] [--replicas 3]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from contextlib import AsyncExitStack
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient

from bench.common import (
    REPO,
    committed,
    create_topics,
    end_offsets,
    kafka,
    produce,
    relay_process,
    say,
    simulator,
    wait_for,
)
from bench.drain import API_UPLOADS_PER_S, API_VALUES_PER_UPLOAD, REAL_LIMITS, backlog

PARTITIONS = 6


async def scale_out_drain(bootstrap: str, values: int, replicas: int) -> dict[str, Any]:
    topics = await create_topics(bootstrap, partitions=PARTITIONS)
    await produce(bootstrap, topics.input, backlog(values))
    ends = await end_offsets(bootstrap, topics.input)
    async with simulator(REAL_LIMITS) as (api_url, account), AsyncExitStack() as stack:
        relays = [
            await stack.enter_async_context(
                relay_process(
                    bootstrap,
                    api_url,
                    topics,
                    REPO / "bench" / ".logs",
                    kafka_transactional_id=f"{topics.group}-{n}",
                )
            )
            for n in range(replicas)
        ]
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        await admin.start()
        try:

            async def fetched() -> bool:
                for relay in relays:
                    relay.check_alive()
                totals = [await relay.metrics() for relay in relays]
                return any(t.get("scm_relay_events_consumed_total", 0) > 0 for t in totals)

            async def all_committed() -> bool:
                for relay in relays:
                    relay.check_alive()
                return await committed(admin, topics.group, topics.input) == ends

            await wait_for(fetched, timeout_s=120, every_s=0.01, what="a fetch")
            started = time.monotonic()
            await wait_for(all_committed, timeout_s=1200, every_s=0.05, what="the last commit")
            seconds = time.monotonic() - started
        finally:
            await admin.close()
        stats = account.stats
    minimum = values / (API_UPLOADS_PER_S * API_VALUES_PER_UPLOAD)
    return {
        "values": values,
        "replicas": replicas,
        "seconds": seconds,
        "minimum_s": minimum,
        "ratio": seconds / minimum,
        "uploads": stats.uploads_accepted,
        "throttled": stats.throttled,
    }


def report(result: dict[str, Any]) -> str:
    return (
        f"{result['replicas']} replicas, {result['values']} values: drained in "
        f"{result['seconds']:.1f} s with {result['uploads']} uploads, "
        f"{result['throttled']} x 429; drain / minimum = {result['ratio']:.3f} "
        f"(minimum {result['minimum_s']:.1f} s; target <= 1.15, zero 429: "
        f"{'yes' if result['throttled'] == 0 else 'no'})"
    )


async def run(values: int, replicas: int) -> list[dict[str, Any]]:
    """One replica, then `replicas`, on the same broker and backlog size: side by side."""
    results = []
    async with kafka() as bootstrap:
        for count in (1, replicas):
            say(f"scale-out: {count} relay(s) drain {values} values at the account's limit")
            results.append(await scale_out_drain(bootstrap, values, count))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--values", type=int, default=200_000)
    parser.add_argument("--replicas", type=int, default=3)
    args = parser.parse_args(argv)
    for result in asyncio.run(run(args.values, args.replicas)):
        print(report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
