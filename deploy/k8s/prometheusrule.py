"""Render deploy/k8s/base/prometheusrule.yaml from deploy/prometheus/alerts.yml.

The alert rules have one source of truth, the Prometheus rule file that promtool
checks and tests; the PrometheusRule resource wraps the same groups. Run by
`make k8s-rules`; a test fails when the committed file differs from this output.

    python deploy/k8s/prometheusrule.py > deploy/k8s/base/prometheusrule.yaml
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

ALERTS = Path(__file__).resolve().parents[1] / "prometheus" / "alerts.yml"

HEADER = """\
# Generated from deploy/prometheus/alerts.yml by `make k8s-rules`; do not edit.
"""


def render(alerts_text: str) -> str:
    rules = yaml.safe_load(alerts_text)
    resource = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "scm-relay"},
        "spec": {"groups": rules["groups"]},
    }
    return HEADER + yaml.safe_dump(resource, sort_keys=False, width=100)


if __name__ == "__main__":
    sys.stdout.write(render(ALERTS.read_text()))
