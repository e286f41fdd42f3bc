"""Figure 5: latency at light load.

50 events per second for a minute (one code each, 5 scm_data groups, so the
uploads stay well under the API's 10 per second), published one at a time. For
each event: the time from just before it was produced to the moment the upload
request carrying its code reached the simulator. Printed: p50 and p99 against
`SCM_RELAY_BATCH_LINGER_MS`; target p99 <= linger + 100 ms.

An event waits in its batch for at most the linger (the batch's oldest event
waits exactly that), so the linger is the floor of the p99 and what is measured
above it is the relay's own overhead.

    python -m bench.latency [--rate 50] [--seconds 60] [--linger-ms 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from typing import Any

from aiokafka import AIOKafkaProducer

from bench.common import (
    REPO,
    TimedAccount,
    create_topics,
    kafka,
    make_events,
    relay_process,
    say,
    simulator,
    values_of,
)
from devkit.harness import wait_until

LIGHT_LOAD_GROUPS = 5


async def paced_produce(
    bootstrap: str, topic: str, rate_per_s: float, seconds: float
) -> dict[str, float]:
    """Publish at `rate_per_s` for `seconds`; returns each code's produce time (time.time())."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=0)
    await producer.start()
    produced: dict[str, float] = {}
    count = int(rate_per_s * seconds)
    try:
        started = time.monotonic()
        for number, record in enumerate(
            make_events(count, groups=LIGHT_LOAD_GROUPS, multi_every=0)
        ):
            await asyncio.sleep(max(0.0, started + number / rate_per_s - time.monotonic()))
            (code,) = values_of(record)
            produced[code] = time.time()
            await producer.send(topic, record, key=code.encode())
        await producer.flush()
    finally:
        await producer.stop()
    return produced


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


async def run(rate_per_s: float, seconds: float, linger_ms: int) -> dict[str, Any]:
    async with kafka() as bootstrap:
        topics = await create_topics(bootstrap)
        async with simulator({}, timed=True) as (api_url, account):
            assert isinstance(account, TimedAccount)
            async with relay_process(
                bootstrap, api_url, topics, REPO / "bench" / ".logs", batch_linger_ms=linger_ms
            ) as relay:
                # The relay has joined its group and read the empty ledger before the clock runs.
                async def reading() -> bool:
                    relay.check_alive()
                    # Ready first: since the relay serves its metrics while it starts (waiting
                    # for Kafka), intake_paused reads 0 before intake has even begun.
                    metrics = await relay.metrics()
                    ready = metrics.get("scm_relay_ready", 0) == 1
                    return ready and metrics.get("scm_relay_intake_paused", 1) == 0

                await wait_until(reading, timeout_s=60, what="the relay to read")
                say(f"latency: {rate_per_s} events/s for {seconds} s, linger {linger_ms} ms")
                produced = await paced_produce(bootstrap, topics.input, rate_per_s, seconds)

                async def all_arrived() -> bool:
                    relay.check_alive()
                    return produced.keys() <= account.arrivals.keys()

                await wait_until(all_arrived, timeout_s=60, interval_s=0.2, what="every upload")
    latencies_ms = [(account.arrivals[code] - at) * 1000 for code, at in produced.items()]
    p50 = statistics.median(latencies_ms)
    p99 = percentile(latencies_ms, 0.99)
    return {
        "events": len(produced),
        "linger_ms": linger_ms,
        "p50_ms": p50,
        "p99_ms": p99,
        "max_ms": max(latencies_ms),
        "uploads": account.stats.uploads_accepted,
        "p99_over_linger_ms": p99 - linger_ms,
    }


def report(result: dict[str, Any]) -> str:
    return "\n".join(
        [
            f"{result['events']} events, {result['uploads']} uploads, linger "
            f"{result['linger_ms']} ms",
            f"produce -> upload at the API: p50 {result['p50_ms']:.0f} ms, p99 "
            f"{result['p99_ms']:.0f} ms, max {result['max_ms']:.0f} ms",
            f"p99 - linger = {result['p99_over_linger_ms']:.0f} ms (target <= 100 ms)",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=50.0)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--linger-ms", type=int, default=1000)
    args = parser.parse_args(argv)
    print(report(asyncio.run(run(args.rate, args.seconds, args.linger_ms))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
