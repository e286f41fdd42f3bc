"""deploy/k8s: rendered by the real kustomize, validated against the Kubernetes schemas.

Built-in kinds are checked by kubernetes-validate (strict: unknown fields fail);
ServiceMonitor and PrometheusRule against the Prometheus Operator CRD schemas in
tests/k8s_schemas (vendored by `make crd-schemas`). Then the parts have to agree:
settings, ports, the drain deadline, the API limits shared by the replicas.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml
from jsonschema import Draft4Validator
from prometheus_client import CollectorRegistry

from service.metrics import RelayMetrics
from service.relay.supervisor import COMMIT_DEADLINE_S
from service.settings import env_name, flat_names
from tests.settings_support import load_as_the_relay

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
SCHEMAS = ROOT / "tests" / "k8s_schemas"
KUBERNETES_VERSION = kubernetes_validate.latest_version()
CUSTOM_KINDS = {"ServiceMonitor", "PrometheusRule"}
# The Scantrust API's per-user limits (docs/scantrust-api.md), shared by all replicas.
API_UPLOADS_PER_S = 10
API_REQUESTS_PER_MIN = 3000


def kustomize_binary() -> str:
    """`make setup` installs kustomize into .tools/bin; a KUSTOMIZE variable or PATH wins."""
    for candidate in (os.environ.get("KUSTOMIZE"), str(ROOT / ".tools" / "bin" / "kustomize")):
        if candidate and Path(candidate).is_file():
            return candidate
    found = shutil.which("kustomize")
    if found is None:
        pytest.fail("kustomize not found: run `make setup` (it installs it into .tools/bin)")
    return found


def render(directory: Path) -> list[dict[str, Any]]:
    built = subprocess.run(
        [kustomize_binary(), "build", str(directory)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert built.returncode == 0, built.stderr
    return [doc for doc in yaml.safe_load_all(built.stdout) if doc]


@pytest.fixture(scope="module", params=["base", "overlays/example"])
def rendered(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    return render(K8S / request.param)


def one(documents: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (found,) = [doc for doc in documents if doc["kind"] == kind]
    return found


def unknown_fields(value: Any, schema: dict[str, Any], path: str = "") -> list[str]:
    """Fields the CRD schema does not declare (CRD schemas allow extras, the API prunes
    them silently, so a typo would be lost without a word)."""
    found: list[str] = []
    if isinstance(value, dict) and "properties" in schema:
        for key, item in value.items():
            if key not in schema["properties"]:
                found.append(f"{path}/{key}")
            else:
                found += unknown_fields(item, schema["properties"][key], f"{path}/{key}")
    elif isinstance(value, list) and "items" in schema:
        for index, item in enumerate(value):
            found += unknown_fields(item, schema["items"], f"{path}/{index}")
    return found


def crd_problems(document: dict[str, Any]) -> list[str]:
    schema = json.loads((SCHEMAS / f"{document['kind'].lower()}.json").read_text())
    problems = [error.message for error in Draft4Validator(schema).iter_errors(document)]
    return problems + [f"unknown field {field}" for field in unknown_fields(document, schema)]


def test_every_rendered_resource_is_valid(rendered: list[dict[str, Any]]) -> None:
    kinds = {doc["kind"] for doc in rendered}
    assert kinds - {"HorizontalPodAutoscaler"} == {
        "ConfigMap",
        "StatefulSet",
        "Service",
        "PodDisruptionBudget",
        "NetworkPolicy",
        "ServiceMonitor",
        "PrometheusRule",
    }
    for document in rendered:
        if document["kind"] in CUSTOM_KINDS:
            assert crd_problems(document) == [], document["kind"]
        else:
            kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)


def test_the_validators_can_fail() -> None:
    deployment = one(render(K8S / "base"), "StatefulSet")
    deployment["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)
    monitor = one(render(K8S / "base"), "ServiceMonitor")
    monitor["spec"]["endpoints"][0]["intervall"] = "15s"
    assert crd_problems(monitor) == ["unknown field /spec/endpoints/0/intervall"]


def test_prometheus_rule_is_generated_from_the_alert_rules_file() -> None:
    generated = subprocess.run(
        [str(ROOT / ".venv" / "bin" / "python"), str(K8S / "prometheusrule.py")],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    committed = (K8S / "base" / "prometheusrule.yaml").read_text()
    assert committed == generated, "run `make k8s-rules`"
    alerts = yaml.safe_load((ROOT / "deploy" / "prometheus" / "alerts.yml").read_text())
    assert yaml.safe_load(committed)["spec"]["groups"] == alerts["groups"]


def settings_of(rendered: list[dict[str, Any]]) -> dict[str, str]:
    return dict(one(rendered, "ConfigMap")["data"])


def test_settings_are_real_load_and_hold_no_secret(
    rendered: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    data = settings_of(rendered)
    container = one(rendered, "StatefulSet")["spec"]["template"]["spec"]["containers"][0]
    env = {entry["name"]: entry for entry in container.get("env", [])}
    relay_env = {name for name in env if name.startswith("SCM_RELAY_")}
    variables = set(data) | relay_env
    assert variables - {env_name(name) for name in flat_names()} == set()
    secret = {"SCM_RELAY_API_TOKEN", "SCM_RELAY_KAFKA_SASL_PASSWORD"}
    assert not secret & set(data)
    for name in secret & set(env):
        assert "secretKeyRef" in env[name]["valueFrom"], f"{name} must come from a Secret"
    for name in set(env) - relay_env:  # what the relay's settings are built from
        assert "fieldRef" in env[name]["valueFrom"], name
    token = tmp_path / "api-token"
    token.write_text("test-token")
    # The Secrets the Deployment names provide the token file and the Kafka password.
    secrets = {"SCM_RELAY_API_TOKEN_FILE": str(token)}
    if data.get("SCM_RELAY_KAFKA_SECURITY_PROTOCOL", "").startswith("SASL_"):
        secrets["SCM_RELAY_KAFKA_SASL_PASSWORD"] = "from-the-secret"
    pod = {"POD_NAME": "scm-relay-1", "POD_NAMESPACE": "scm-relay"}
    expanded = {
        name: expand(entry["value"], pod) for name, entry in env.items() if "value" in entry
    }
    settings = load_as_the_relay(monkeypatch, {**data, **secrets, **expanded})
    assert settings.api.token is not None
    assert settings.kafka.transactional_id == "scm-relay.scm-relay.scm-relay-1"


def expand(value: str, variables: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion of an env value."""
    for name, replacement in variables.items():
        value = value.replace(f"$({name})", replacement)
    assert "$(" not in value, value
    return value


def test_each_replica_has_a_stable_transactional_id_from_its_pod_name(
    rendered: list[dict[str, Any]],
) -> None:
    # A restarted pod keeps its name, so its producer fences its previous incarnation.
    statefulset = one(rendered, "StatefulSet")
    (container,) = statefulset["spec"]["template"]["spec"]["containers"]
    env = {entry["name"]: entry for entry in container["env"]}
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    assert "$(POD_NAME)" in env["SCM_RELAY_KAFKA_TRANSACTIONAL_ID"]["value"]
    names = list(env)
    assert names.index("POD_NAME") < names.index("SCM_RELAY_KAFKA_TRANSACTIONAL_ID")
    service = one(rendered, "Service")
    assert statefulset["spec"]["serviceName"] == service["metadata"]["name"]
    assert service["spec"]["clusterIP"] == "None", "a StatefulSet's governing Service"


def test_the_autoscaler_scales_the_relays_on_a_metric_they_export() -> None:
    rendered = render(K8S / "overlays/example")
    autoscaler = one(rendered, "HorizontalPodAutoscaler")
    statefulset = one(rendered, "StatefulSet")
    target = autoscaler["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("StatefulSet", statefulset["metadata"]["name"])
    (metric,) = autoscaler["spec"]["metrics"]
    exported = {family.name for family in RelayMetrics(CollectorRegistry()).registry.collect()}
    assert metric["pods"]["metric"]["name"] in exported
    assert autoscaler["spec"]["minReplicas"] <= statefulset["spec"]["replicas"]


def test_pods_are_probed_locked_down_sized_and_drain_in_time(
    rendered: list[dict[str, Any]],
) -> None:
    data = settings_of(rendered)
    deployment = one(rendered, "StatefulSet")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert deployment["spec"]["replicas"] == 2
    port = int(data["SCM_RELAY_HTTP_PORT"])
    (container_port,) = container["ports"]
    assert container_port["containerPort"] == port
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert lock_down_gaps(pod) == []
    assert container["resources"]["requests"]
    assert container["resources"]["limits"]
    drain_s = (
        float(data["SCM_RELAY_SHUTDOWN_TIMEOUT_S"])
        + float(data["SCM_RELAY_API_REQUEST_TIMEOUT_S"])
        + COMMIT_DEADLINE_S
    )
    assert pod["terminationGracePeriodSeconds"] > drain_s
    token_file = Path(data["SCM_RELAY_API_TOKEN_FILE"])
    mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
    volume = next(v for v in pod["volumes"] if v["name"] == mounts[str(token_file.parent)])
    assert "secret" in volume


def lock_down_gaps(pod: dict[str, Any]) -> list[str]:
    """What the pod spec lacks of the lock-down docs/security.md cites."""
    (container,) = pod["containers"]
    pod_context = pod.get("securityContext", {})
    context = container.get("securityContext", {})
    wanted = {
        "pod runAsNonRoot": pod_context.get("runAsNonRoot") is True
        or context.get("runAsNonRoot") is True,
        "pod seccompProfile RuntimeDefault": pod_context.get("seccompProfile")
        == {"type": "RuntimeDefault"}
        or context.get("seccompProfile") == {"type": "RuntimeDefault"},
        "automountServiceAccountToken false": pod.get("automountServiceAccountToken") is False,
        "readOnlyRootFilesystem": context.get("readOnlyRootFilesystem") is True,
        "allowPrivilegeEscalation false": context.get("allowPrivilegeEscalation") is False,
        "capabilities drop ALL": context.get("capabilities", {}).get("drop") == ["ALL"]
        and not context.get("capabilities", {}).get("add"),
        "not privileged": not context.get("privileged", False),
    }
    return [name for name, present in wanted.items() if not present]


@pytest.mark.parametrize(
    ("where", "field", "value"),
    [
        ("pod", "runAsNonRoot", False),
        ("pod", "seccompProfile", {"type": "Unconfined"}),
        ("pod", "automountServiceAccountToken", None),
        ("container", "readOnlyRootFilesystem", None),
        ("container", "allowPrivilegeEscalation", True),
        ("container", "capabilities", {"drop": ["ALL"], "add": ["NET_ADMIN"]}),
        ("container", "capabilities", None),
    ],
)
def test_the_lock_down_check_finds_each_item_missing(where: str, field: str, value: Any) -> None:
    pod = one(render(K8S / "base"), "StatefulSet")["spec"]["template"]["spec"]
    assert lock_down_gaps(pod) == []
    target = {
        "pod": pod["securityContext"],
        "container": pod["containers"][0]["securityContext"],
    }[where]
    if field == "automountServiceAccountToken":
        target = pod
    if value is None:
        del target[field]
    else:
        target[field] = value
    assert len(lock_down_gaps(pod)) == 1


def test_the_network_policy_admits_monitoring_to_metrics_and_lets_out_dns_kafka_and_the_api(
    rendered: list[dict[str, Any]],
) -> None:
    policy = one(rendered, "NetworkPolicy")["spec"]
    template = one(rendered, "StatefulSet")["spec"]["template"]
    selected = policy["podSelector"]["matchLabels"]
    assert selected.items() <= template["metadata"]["labels"].items(), "it selects the relays"
    assert sorted(policy["policyTypes"]) == ["Egress", "Ingress"]
    # In: the metrics port, from the monitoring namespace only.
    (rule,) = policy["ingress"]
    assert rule["from"] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    ]
    (port,) = rule["ports"]
    (container,) = template["spec"]["containers"]
    (metrics,) = container["ports"]
    data = settings_of(rendered)
    assert port == {"port": metrics["name"], "protocol": "TCP"}
    assert metrics["containerPort"] == int(data["SCM_RELAY_HTTP_PORT"])
    # Out: every rule names its ports (a rule without ports opens every port).
    assert all(egress.get("ports") for egress in policy["egress"])
    allowed = {
        (allow["port"], allow.get("protocol", "TCP"))
        for egress in policy["egress"]
        for allow in egress["ports"]
    }
    kafka_ports = {
        int(server.rsplit(":", 1)[1])
        for server in data["SCM_RELAY_KAFKA_BOOTSTRAP_SERVERS"].split(",")
    }
    api = urlsplit(data["SCM_RELAY_API_BASE_URL"])
    assert api.scheme == "https"
    assert allowed == {
        (53, "UDP"),
        (53, "TCP"),
        *((kafka, "TCP") for kafka in kafka_ports),
        (api.port or 443, "TCP"),
    }


def test_the_limits_set_are_the_accounts_whatever_the_replicas(
    rendered: list[dict[str, Any]],
) -> None:
    # The replicas divide these between them (docs/design.md section 12).
    data = settings_of(rendered)
    assert float(data["SCM_RELAY_UPLOAD_RATE_PER_S"]) <= API_UPLOADS_PER_S
    assert int(data["SCM_RELAY_API_RATE_PER_MIN"]) <= API_REQUESTS_PER_MIN


def test_prometheus_scrapes_the_service_port_under_the_job_the_alerts_use(
    rendered: list[dict[str, Any]],
) -> None:
    service = one(rendered, "Service")
    monitor = one(rendered, "ServiceMonitor")
    deployment = one(rendered, "StatefulSet")
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {port["name"] for port in service["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    assert service["metadata"]["labels"][monitor["spec"]["jobLabel"]] == "scm-relay"
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    budget = one(rendered, "PodDisruptionBudget")
    assert budget["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
