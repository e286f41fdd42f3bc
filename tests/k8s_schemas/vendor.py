"""Copy the OpenAPI schemas of the Prometheus Operator CRDs the manifests use.

kubernetes-validate knows the built-in kinds only; ServiceMonitor and
PrometheusRule are checked against their CRDs' `openAPIV3Schema`, taken from the
prometheus-operator module (Apache-2.0) by `make crd-schemas`:

    python tests/k8s_schemas/vendor.py <prometheus-operator module directory> <version>
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
CRDS = {
    "ServiceMonitor": "monitoring.coreos.com_servicemonitors.yaml",
    "PrometheusRule": "monitoring.coreos.com_prometheusrules.yaml",
}


def main(module_dir: Path, version: str) -> None:
    for kind, file_name in CRDS.items():
        crd = yaml.safe_load(
            (module_dir / "example" / "prometheus-operator-crd" / file_name).read_text()
        )
        (served,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        schema = served["schema"]["openAPIV3Schema"]
        schema["x-source"] = (
            f"prometheus-operator {version}, example/prometheus-operator-crd/{file_name}"
        )
        (HERE / f"{kind.lower()}.json").write_text(
            json.dumps(schema, indent=1, sort_keys=True) + "\n"
        )


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
