"""Figure 3: draining a backlog at the API's limit.

A backlog of V constraint values (default 200 000; 4 scm_data groups, one code per
event, some pallets) waits in Kafka; the simulator enforces the real limits (10
uploads per second, 3000 requests per minute) and its usual task times. The relay
runs with its defaults. Drain time is measured from the relay's first fetch to its
last offset committed (every value uploaded and recorded); the theoretical minimum
is V / (10 x 1000) seconds. It runs twice: on a quiet machine against an API on
loopback, and as production sees it (issue 29): every request travels a random
0-30 ms before the simulator's throttle counts it, and a process burns one of the
machine's cores meanwhile. Target for the second: drain / minimum <= 1.05 with zero
429 answers.

The comparison row is the plain approach of a generic HTTP sink: one upload request
per event, retrying 429s after the wait the API asks for. It runs for a short while
against the same simulator and its drain time for the same backlog is projected
from the values per second it reached (a real run would take hours).

    python -m bench.drain [--values 200000] [--sink-seconds 15]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, nullcontext
from typing import Any

import aiohttp

from bench.common import (
    REPO,
    TOKEN,
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
    values_of,
)
from service.scantrust.client import UPLOAD_PATH

API_UPLOADS_PER_S = 10
API_VALUES_PER_UPLOAD = 1000
REAL_LIMITS = {"upload_rate_per_s": API_UPLOADS_PER_S, "overall_rate_per_min": 3000}


def backlog(values: int) -> list[bytes]:
    """Events holding exactly `values` constraint values."""
    records: list[bytes] = []
    total = 0
    for record in make_events(values, groups=4):
        count = len(values_of(record))
        if total + count > values:
            break
        records.append(record)
        total += count
    # Top up with one-code events of the same groups, with codes not used above.
    records += make_events(values - total, groups=4, multi_every=0, first_code=10 * values)
    return records


# Production's network, as the target of issue 29 puts it: a random one-way delay.
ONE_WAY_DELAY_S = 0.03


@asynccontextmanager
async def burning_a_core() -> AsyncIterator[None]:
    """A process spinning on one core (the load of a busy, shared machine)."""
    burner = await asyncio.create_subprocess_exec(sys.executable, "-c", "while True: pass")
    try:
        yield
    finally:
        burner.kill()
        await burner.wait()


async def relay_drain(bootstrap: str, values: int, *, production: bool = False) -> dict[str, Any]:
    topics = await create_topics(bootstrap)
    records = backlog(values)
    await produce(bootstrap, topics.input, records)
    faults = REAL_LIMITS | ({"one_way_delay_s": ONE_WAY_DELAY_S} if production else {})
    async with (
        burning_a_core() if production else nullcontext(),
        simulator(faults) as (api_url, account),
        relay_process(bootstrap, api_url, topics, REPO / "bench" / ".logs") as relay,
    ):
        span = await first_fetch_to_last_commit(
            relay, bootstrap, topics, timeout_s=1200, every_s=0.05
        )
        stats = account.stats
        uploads = await relay.metrics(endpoint="upload")
    duration = "scm_relay_api_request_duration_seconds"
    round_trip_s = rate(uploads[f"{duration}_sum"], uploads[f"{duration}_count"])
    minimum = values / (API_UPLOADS_PER_S * API_VALUES_PER_UPLOAD)
    seconds = span.seconds
    return {
        "values": values,
        "production": production,
        "seconds": seconds,
        "minimum_s": minimum,
        "ratio": seconds / minimum,
        "uploads": stats.uploads_accepted,
        "values_uploaded": stats.upload_values_total,
        "throttled": stats.throttled,
        "upload_round_trip_s": round_trip_s,
        "fewest_uploads": best_fill(records)[0],
    }


async def generic_sink(values: int, seconds: float) -> dict[str, Any]:
    """One request per event, retrying 429s; projected to the whole backlog."""
    records = backlog(min(values, 50_000))
    async with simulator(REAL_LIMITS) as (api_url, account):
        headers = {"Authorization": f"UAT {TOKEN}"}
        timeout = aiohttp.ClientTimeout(total=30)
        sent_values = 0
        throttled = 0
        started = time.monotonic()
        async with aiohttp.ClientSession(headers=headers, timeout=timeout) as session:
            for record in records:
                if time.monotonic() - started >= seconds:
                    break
                event = json.loads(record)
                body = {"constraints": event["constraints"], "scm_data": event["scm_data"]}
                while True:
                    async with session.post(api_url + UPLOAD_PATH, json=body) as response:
                        if response.status != 429:
                            response.raise_for_status()
                            break
                        throttled += 1
                        wait = float(response.headers.get("Retry-After", "1"))
                    await asyncio.sleep(wait)
                sent_values += len(event["constraints"]["extended_id"])
        elapsed = time.monotonic() - started
        accepted = account.stats.uploads_accepted
    per_s = sent_values / elapsed
    projected = values / per_s
    minimum = values / (API_UPLOADS_PER_S * API_VALUES_PER_UPLOAD)
    return {
        "seconds_run": elapsed,
        "values_per_s": per_s,
        "requests": accepted,
        "throttled": throttled,
        "projected_s": projected,
        "ratio": projected / minimum,
    }


async def run(values: int, sink_seconds: float) -> dict[str, Any]:
    async with kafka() as bootstrap:
        say(f"drain: the relay drains {values} values at the API limit")
        relay = await relay_drain(bootstrap, values)
        say(f"drain: again, {ONE_WAY_DELAY_S * 1000:.0f} ms random one-way delay, one core busy")
        production = await relay_drain(bootstrap, values, production=True)
    say(f"drain: a one-request-per-event sink for {sink_seconds} s")
    sink = await generic_sink(values, sink_seconds)
    return {"relay": relay, "production": production, "sink": sink}


def _drained(run: dict[str, Any]) -> str:
    where = (
        f"{ONE_WAY_DELAY_S * 1000:.0f} ms random one-way delay, one core busy"
        if run["production"]
        else "loopback, quiet"
    )
    return (
        f"relay ({where}): drained in {run['seconds']:.1f} s with {run['uploads']} uploads "
        f"(fewest possible for this backlog: {run['fewest_uploads']}), "
        f"{run['throttled']} x 429; mean upload round trip "
        f"{run['upload_round_trip_s'] * 1000:.0f} ms; drain / minimum = {run['ratio']:.3f}"
    )


def report(result: dict[str, Any]) -> str:
    relay, production, sink = result["relay"], result["production"], result["sink"]
    return "\n".join(
        [
            f"backlog: {relay['values']} values; minimum at 10 uploads/s x 1000 values: "
            f"{relay['minimum_s']:.1f} s",
            _drained(relay),
            _drained(production),
            f"one request per event (generic sink): {sink['values_per_s']:.1f} values/s over "
            f"{sink['seconds_run']:.0f} s, {sink['throttled']} x 429; projected "
            f"{sink['projected_s']:.0f} s, ratio {sink['ratio']:.1f}",
            f"drain / minimum as production sees it = {production['ratio']:.3f} (target <= "
            f"1.05, zero 429: {'yes' if production['throttled'] == 0 else 'no'})",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--values", type=int, default=200_000)
    parser.add_argument("--sink-seconds", type=float, default=15.0)
    args = parser.parse_args(argv)
    result = asyncio.run(run(args.values, args.sink_seconds))
    print(report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
