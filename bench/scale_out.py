"""Three replicas draining one backlog at the account's limit, sharing it.

The backlog of `bench.drain` (default 200 000 values) waits in an input topic of 6
partitions; three relays of one consumer group start together against the
simulator with the real limits (10 uploads per second, 3000 requests per minute
per account). No setting divides the limit: each replica takes the upload slots
of the partitions it owns (docs/design.md section 12). Drain time is measured from
the first fetch of any replica to the last offset committed; the minimum is
V / (10 x 1000) seconds. Target (the chaos issue): zero 429 and <= 1.15 x minimum.

Then the same backlog under one hot key (every event in one partition), drained by
one replica and by three (issue 29's target: three within 1.10 x the time of one).
The slots belong to partitions, so three replicas send the hot partition's backlog
only in its owner's slots: this measures what that costs.

    python -m bench.scale_out [--values 200000] [--replicas 3]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from contextlib import AsyncExitStack
from typing import Any

from bench.common import (
    REPO,
    committed,
    create_topics,
    kafka,
    produce,
    relay_process,
    say,
    simulator,
)
from bench.drain import API_UPLOADS_PER_S, API_VALUES_PER_UPLOAD, REAL_LIMITS, backlog
from devkit.harness import admin_client, end_offsets, wait_until

PARTITIONS = 6


HOT_KEY = b"one-hot-key"


async def scale_out_drain(
    bootstrap: str, values: int, replicas: int, *, hot: bool = False
) -> dict[str, Any]:
    topics = await create_topics(bootstrap, partitions=PARTITIONS)
    await produce(bootstrap, topics.input, backlog(values), key=HOT_KEY if hot else None)
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
        async with admin_client(bootstrap) as admin:

            async def fetched() -> bool:
                for relay in relays:
                    relay.check_alive()
                totals = [await relay.metrics() for relay in relays]
                return any(t.get("scm_relay_events_consumed_total", 0) > 0 for t in totals)

            async def all_committed() -> bool:
                for relay in relays:
                    relay.check_alive()
                return await committed(admin, topics.group, topics.input) == ends

            await wait_until(fetched, timeout_s=120, interval_s=0.01, what="a fetch")
            started = time.monotonic()
            await wait_until(all_committed, timeout_s=1200, interval_s=0.05, what="the last commit")
            seconds = time.monotonic() - started
        stats = account.stats
    minimum = values / (API_UPLOADS_PER_S * API_VALUES_PER_UPLOAD)
    return {
        "values": values,
        "replicas": replicas,
        "hot": hot,
        "seconds": seconds,
        "minimum_s": minimum,
        "ratio": seconds / minimum,
        "uploads": stats.uploads_accepted,
        "throttled": stats.throttled,
    }


def report(result: dict[str, Any]) -> str:
    backlog_kind = "under one hot key" if result["hot"] else f"over {PARTITIONS} partitions"
    return (
        f"{result['replicas']} replica(s), {result['values']} values {backlog_kind}: drained in "
        f"{result['seconds']:.1f} s with {result['uploads']} uploads, "
        f"{result['throttled']} x 429; drain / minimum = {result['ratio']:.3f} "
        f"(minimum {result['minimum_s']:.1f} s)"
    )


def hot_key_ratio(results: list[dict[str, Any]]) -> float:
    """The hot-key drain time of the most replicas over that of one."""
    hot = sorted((r for r in results if r["hot"]), key=lambda r: r["replicas"])
    return float(hot[-1]["seconds"] / hot[0]["seconds"])


def spread_throttled(results: list[dict[str, Any]]) -> int:
    """The 429s of the most replicas draining the spread backlog."""
    spread = sorted((r for r in results if not r["hot"]), key=lambda r: r["replicas"])
    return int(spread[-1]["throttled"])


def summary(results: list[dict[str, Any]]) -> str:
    return "\n".join(
        [
            *(report(result) for result in results),
            f"hot key: {max(r['replicas'] for r in results)} replicas / 1 = "
            f"{hot_key_ratio(results):.2f} (target <= 1.10)",
            f"spread backlog, {max(r['replicas'] for r in results)} replicas: "
            f"{spread_throttled(results)} x 429 (target 0)",
        ]
    )


async def run(values: int, replicas: int) -> list[dict[str, Any]]:
    """One replica, then `replicas`, on the same broker and backlog size: side by side;
    on a backlog spread over the partitions, then under one hot key."""
    results = []
    async with kafka() as bootstrap:
        for hot in (False, True):
            for count in (1, replicas):
                say(
                    f"scale-out: {count} relay(s) drain {values} values "
                    f"{'under one hot key' if hot else 'spread'} at the account's limit"
                )
                results.append(await scale_out_drain(bootstrap, values, count, hot=hot))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--values", type=int, default=200_000)
    parser.add_argument("--replicas", type=int, default=3)
    args = parser.parse_args(argv)
    print(summary(asyncio.run(run(args.values, args.replicas))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
