"""The benchmarks, with tiny sizes, so their code cannot rot (`make bench` runs them
in earnest). The figures of a smoke run mean nothing; what is checked is that every
benchmark runs against the real broker, the relay process and the simulator, and
measures what it says it measures."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import run_all

pytestmark = pytest.mark.kafka


@pytest.mark.timeout(600)
def test_every_benchmark_runs_and_the_report_is_written(
    kafka_bootstrap: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SCM_RELAY_BENCH_KAFKA", kafka_bootstrap)
    out = tmp_path / "benchmarks.md"
    out.write_text(f"old figures\n{run_all.KEPT_MARKER}\n## Profiling\n\nkept notes\n")
    results = run_all.measure_and_write(run_all.SMOKE, out)
    written = out.read_text()
    assert "old figures" not in written
    assert written.endswith("## Profiling\n\nkept notes\n")
    for figure, *_ in run_all.verdicts(results):
        assert f"| {figure} |" in written
    sizes = run_all.SMOKE
    throughput = results["throughput"]
    assert throughput["relay"]["events_per_s"] > 0
    assert throughput["relay"]["tasks_finished"] == throughput["relay"]["uploads"]
    assert 1 <= throughput["relay"]["values_per_upload"] <= 1000
    for kind in ("relay", "production"):
        drain = results["drain"][kind]
        assert drain["values_uploaded"] == sizes["drain"]["values"], kind
        assert drain["throttled"] == 0, kind
    scaled = results["scale_out"]
    assert [(r["hot"], r["replicas"]) for r in scaled] == [
        (False, 1),
        (False, 2),
        (True, 1),
        (True, 2),
    ]
    assert all(r["uploads"] > 0 and r["throttled"] == 0 for r in scaled), scaled
    memory = results["memory"]
    assert memory["small"]["events_read"] >= sizes["memory"]["small"]
    assert memory["large"]["peak_rss_bytes"] > 10_000_000
    latency = results["latency"]
    assert latency["events"] == sizes["latency"]["rate_per_s"] * sizes["latency"]["seconds"]
    assert 0 < latency["p50_ms"] <= latency["p99_ms"]
