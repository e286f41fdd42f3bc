"""Alert rules, the dashboard and the runbooks only name metrics the relay exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client import CollectorRegistry

from service.metrics import RelayMetrics

ROOT = Path(__file__).resolve().parents[2]
METRIC = re.compile(r"\bscm_relay_[a-z_]+\b")


def exported_series() -> set[str]:
    """Every series name a scrape can show, histogram and counter suffixes included."""
    registry = CollectorRegistry()
    RelayMetrics(registry)
    suffixes = {
        "counter": ("_total",),
        "histogram": ("_bucket", "_sum", "_count"),
        "gauge": ("",),
    }
    return {
        family.name + suffix for family in registry.collect() for suffix in suffixes[family.type]
    }


def test_dashboard_uses_only_exported_metrics() -> None:
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "scm-relay.json").read_text())
    expressions = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {name for expr in expressions for name in METRIC.findall(expr)}
    assert used, "the dashboard queries no metric"
    assert used - exported_series() == set()


def test_alert_rules_use_only_exported_metrics_and_have_runbooks() -> None:
    rules = (ROOT / "deploy" / "prometheus" / "alerts.yml").read_text()
    used = set(METRIC.findall(rules)) - {"scm_relay"}
    assert used - exported_series() == set()
    alerts = re.findall(r"- alert: (\w+)", rules)
    assert len(alerts) >= 10
    runbooks = (ROOT / "docs" / "runbooks.md").read_text()
    headings = {
        line[3:].strip().lower() for line in runbooks.splitlines() if line.startswith("## ")
    }
    for alert in alerts:
        assert alert.lower() in headings, f"no runbook section for {alert}"
        assert f"runbook_url: docs/runbooks.md#{alert.lower()}" in rules
