"""Figure 4: memory stays flat however large the backlog.

The API is down (the simulator answers 503 to everything). A backlog of 100 000
events, and then one of 1 000 000, waits in Kafka; the relay reads what its bounds
allow, finds the API down and holds. Once its intake has settled (nothing more
read for a while) the relay's peak RSS (the kernel's VmHWM) is taken. Target: the
1 M case within 10 % of the 100 K case, and under 200 MB.

    python -m bench.memory [--small 100000] [--large 1000000] [--settle-s 5]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from typing import Any

from bench.common import (
    REPO,
    create_topics,
    kafka,
    make_events,
    produce,
    relay_process,
    say,
    simulator,
)

API_DOWN = {"error_rate": 1.0}
MB = 1_000_000


async def peak_rss_with_backlog(bootstrap: str, events: int, settle_s: float) -> dict[str, Any]:
    topics = await create_topics(bootstrap)
    say(f"memory: producing {events} events")
    await produce(bootstrap, topics.input, make_events(events))
    async with (
        simulator(API_DOWN) as (api_url, _account),
        relay_process(bootstrap, api_url, topics, REPO / "bench" / ".logs") as relay,
    ):
        started = time.monotonic()
        consumed = -1.0
        steady_since = time.monotonic()
        while time.monotonic() - steady_since < settle_s:
            await asyncio.sleep(0.5)
            relay.check_alive()
            now = (await relay.metrics()).get("scm_relay_events_consumed_total", 0)
            if now != consumed or now == 0:
                consumed, steady_since = now, time.monotonic()
            if time.monotonic() - started > 600:
                raise TimeoutError("the relay's intake did not settle within 600 s")
        metrics = await relay.metrics()
        peak = relay.peak_rss_bytes()
    return {
        "events": events,
        "peak_rss_bytes": peak,
        "events_read": metrics.get("scm_relay_events_consumed_total", 0),
        "buffered_values": metrics.get("scm_relay_buffered_values", 0),
        "paused": metrics.get("scm_relay_intake_paused", 0),
    }


async def run(small: int, large: int, settle_s: float) -> dict[str, Any]:
    async with kafka() as bootstrap:
        small_case = await peak_rss_with_backlog(bootstrap, small, settle_s)
        large_case = await peak_rss_with_backlog(bootstrap, large, settle_s)
    return {
        "small": small_case,
        "large": large_case,
        "ratio": large_case["peak_rss_bytes"] / small_case["peak_rss_bytes"],
    }


def report(result: dict[str, Any]) -> str:
    lines = []
    for case in (result["small"], result["large"]):
        lines.append(
            f"{case['events']:>9} events waiting: peak RSS {case['peak_rss_bytes'] / MB:6.1f} MB "
            f"(read {case['events_read']:.0f} events, {case['buffered_values']:.0f} values "
            f"buffered, intake paused: {case['paused']:.0f})"
        )
    large_mb = result["large"]["peak_rss_bytes"] / MB
    lines.append(
        f"large / small peak RSS = {result['ratio']:.3f} (target <= 1.10; "
        f"large case {large_mb:.1f} MB, target < 200 MB)"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", type=int, default=100_000)
    parser.add_argument("--large", type=int, default=1_000_000)
    parser.add_argument("--settle-s", type=float, default=5.0)
    args = parser.parse_args(argv)
    print(report(asyncio.run(run(args.small, args.large, args.settle_s))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
