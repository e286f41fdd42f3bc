"""Run every benchmark in one go and write docs/benchmarks.md (`make bench`).

Each figure is a ratio of two things measured side by side in this run, on this
machine; the absolute numbers are printed for reference only. Everything below
the line `<!-- kept below -->` in the existing file (the profiling notes) is kept.

    python -m bench.run_all [--out docs/benchmarks.md] [--smoke]

`--smoke` runs every benchmark with tiny sizes (the test suite does this so the
benchmark code cannot rot); its figures mean nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import importlib.metadata
import sys
import time
from pathlib import Path
from typing import Any

from bench import drain, latency, memory, scale_out, throughput
from bench.common import REPO, commit, machine, say

KEPT_MARKER = "<!-- kept below -->"
FULL: dict[str, dict[str, Any]] = {
    "throughput": {"events": 500_000},
    "drain": {"values": 200_000, "sink_seconds": 15.0},
    "memory": {"small": 100_000, "large": 1_000_000, "settle_s": 5.0},
    "latency": {"rate_per_s": 50.0, "seconds": 60.0, "linger_ms": 1000},
    "scale_out": {"values": 100_000, "replicas": 3},
}
SMOKE: dict[str, dict[str, Any]] = {
    "throughput": {"events": 3000},
    "drain": {"values": 3000, "sink_seconds": 1.0},
    "memory": {"small": 500, "large": 2000, "settle_s": 2.0},
    "latency": {"rate_per_s": 20.0, "seconds": 3.0, "linger_ms": 200},
    "scale_out": {"values": 2000, "replicas": 2},
}


def kafka_version() -> str:
    pom = (REPO / "deploy" / "local-kafka" / "pom.xml").read_text()
    start = pom.index("<kafka.version>") + len("<kafka.version>")
    return pom[start : pom.index("</kafka.version>")]


def verdicts(results: dict[str, Any]) -> list[tuple[str, str, str, bool | None]]:
    """(figure, measured, target, met) for each target of the issue; met is None for
    figures printed for comparison, without a target."""
    t, d, m, lat, scale = (
        results[k] for k in ("throughput", "drain", "memory", "latency", "scale_out")
    )
    prod = d["production"]
    replicas = max(r["replicas"] for r in scale)
    large_mb = m["large"]["peak_rss_bytes"] / 1e6
    return [
        (
            "1. relay / (consume + json.loads)",
            f"{t['c_over_j']:.3f}",
            ">= 0.25",
            t["c_over_j"] >= 0.25,
        ),
        (
            "1. parse_event / (consume + json.loads)",
            f"{t['b_over_j']:.2f}",
            ">= 0.7",
            t["b_over_j"] >= 0.7,
        ),
        ("1. throughput c/b", f"{t['c_over_b']:.2f}", "(printed)", None),
        ("1. throughput c/a", f"{t['c_over_a']:.2f}", "(printed)", None),
        (
            "2. values per upload",
            f"{t['relay']['values_per_upload']:.1f}",
            ">= 990",
            t["relay"]["values_per_upload"] >= 990,
        ),
        (
            "2. values per upload / this input's best",
            f"{t['relay']['values_per_upload'] / t['best_values_per_upload']:.3f} "
            f"(best {t['best_values_per_upload']:.1f})",
            "(printed)",
            None,
        ),
        (
            "2. status requests per finished task",
            f"{t['relay']['status_requests_per_task']:.3f}",
            "<= 0.05",
            t["relay"]["status_requests_per_task"] <= 0.05,
        ),
        (
            "3. drain / minimum, loopback, quiet",
            f"{d['relay']['ratio']:.3f} ({d['relay']['throttled']} x 429)",
            "(printed)",
            None,
        ),
        (
            f"3. drain / minimum, {drain.ONE_WAY_DELAY_S * 1000:.0f} ms one-way delay, a core busy",
            f"{prod['ratio']:.3f} ({prod['throttled']} x 429)",
            "<= 1.05, zero 429",
            prod["ratio"] <= 1.05 and prod["throttled"] == 0,
        ),
        (
            "3. one request per event / minimum",
            f"{d['sink']['ratio']:.0f} (projected)",
            "(comparison)",
            None,
        ),
        (
            "4. peak RSS 1 M / 100 K",
            f"{m['ratio']:.3f} ({large_mb:.0f} MB)",
            "<= 1.10, < 200 MB",
            m["ratio"] <= 1.10 and large_mb < 200,
        ),
        (
            "5. latency p99 - linger",
            f"{lat['p99_over_linger_ms']:.0f} ms (p50 {lat['p50_ms']:.0f}, "
            f"p99 {lat['p99_ms']:.0f})",
            "<= 100 ms",
            lat["p99_over_linger_ms"] <= 100,
        ),
        (
            f"6. hot-key drain, {replicas} replicas / 1",
            f"{scale_out.hot_key_ratio(scale):.2f}",
            "<= 1.10",
            scale_out.hot_key_ratio(scale) <= 1.10,
        ),
        (
            f"6. spread drain, {replicas} replicas: 429s",
            f"{scale_out.spread_throttled(scale)}",
            "0",
            scale_out.spread_throttled(scale) == 0,
        ),
    ]


def markdown(results: dict[str, Any], reports: dict[str, str], seconds: float, kept: str) -> str:
    info = machine()
    versions = ", ".join(
        f"{name} {importlib.metadata.version(name)}"
        for name in ("aiokafka", "aiohttp", "pydantic", "prometheus-client")
    )
    marks = {True: "met", False: "**missed**", None: ""}
    rows = "\n".join(
        f"| {figure} | {measured} | {target} | {marks[met]} |"
        for figure, measured, target, met in verdicts(results)
    )
    sections = "\n\n".join(
        f"### {title}\n\n```\n{reports[key]}\n```"
        for key, title in (
            ("throughput", "1 and 2. Throughput and request efficiency (`bench/throughput.py`)"),
            ("drain", "3. Drain at the API limit (`bench/drain.py`)"),
            ("memory", "4. Memory with the API down (`bench/memory.py`)"),
            ("latency", "5. Latency at light load (`bench/latency.py`)"),
            ("scale_out", "6. Replicas sharing the account (`bench/scale_out.py`)"),
        )
    )
    return f"""# Benchmarks

<!-- Written by `make bench` (bench/run_all.py); the part above the kept marker is
replaced on every run. -->

Measured {datetime.date.today().isoformat()} at commit `{commit()}` with `make bench`
({seconds / 60:.1f} minutes).
Every figure is a ratio of two things measured side by side in the same run on
the same machine; these machines are shared and noisy, so the absolute numbers
are for reference only and no test asserts them.

- Machine: {info["cpu"]}, {info["memory"]}
- Python {info["python"]}, Apache Kafka {kafka_version()} (local, one node:
  `deploy/local-kafka`), {versions}
- The relay runs as its own process (`python -m service run`); the simulator
  and the measuring code share the benchmark process.

| figure | measured | target | |
|---|---|---|---|
{rows}

{sections}

{KEPT_MARKER}
{kept}"""


async def run(sizes: dict[str, dict[str, Any]]) -> tuple[dict[str, Any], dict[str, str]]:
    modules = {"throughput": throughput, "drain": drain, "memory": memory, "latency": latency}
    results: dict[str, Any] = {}
    reports: dict[str, str] = {}
    for name, module in modules.items():
        say(f"=== {name} ===")
        results[name] = await module.run(**sizes[name])
        reports[name] = module.report(results[name])
        print(reports[name], flush=True)
    say("=== scale_out ===")
    results["scale_out"] = await scale_out.run(**sizes["scale_out"])
    reports["scale_out"] = scale_out.summary(results["scale_out"])
    print(reports["scale_out"], flush=True)
    return results, reports


def measure_and_write(sizes: dict[str, dict[str, Any]], out: Path) -> dict[str, Any]:
    """Run every benchmark, write the report to `out` (keeping its kept part)."""
    started = time.monotonic()
    results, reports = asyncio.run(run(sizes))
    previous = out.read_text() if out.exists() else ""
    kept = previous.split(KEPT_MARKER, 1)[1].lstrip("\n") if KEPT_MARKER in previous else ""
    out.write_text(markdown(results, reports, time.monotonic() - started, kept))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks.md")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks the code only")
    args = parser.parse_args(argv)
    results = measure_and_write(SMOKE if args.smoke else FULL, args.out)
    missed = [figure for figure, _, _, met in verdicts(results) if met is False]
    print(f"wrote {args.out}; targets missed: {', '.join(missed) or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
