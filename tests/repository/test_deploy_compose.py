"""deploy/compose.yaml: valid against the Compose specification, and consistent.

There is no Docker engine on the test machines, so the stack is not started here;
what can be checked without one is: the file against the Compose spec's JSON
Schema (as vendored by check-jsonschema), the relay's environment against the real
Settings class, and that ports, topics, tokens and mounted files agree.
"""

from __future__ import annotations

import json
import re
import subprocess
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema.protocols import Validator
from jsonschema.validators import validator_for

from service.relay.supervisor import COMMIT_DEADLINE_S
from service.settings import env_name, flat_names
from tests.settings_support import load_as_the_relay

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
COMPOSE = DEPLOY / "compose.yaml"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(loaded, dict)
    return loaded


def compose_validator() -> Validator:
    """The Compose spec's schema, with the validator class its `$schema` names."""
    vendored = resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
    schema = json.loads(vendored.read_text())
    validator: Validator = validator_for(schema)(schema)
    return validator


def relay_environment(compose: dict[str, Any]) -> dict[str, str]:
    return {k: str(v) for k, v in compose["services"]["relay"]["environment"].items()}


def test_compose_file_is_valid_against_the_compose_specification(compose: dict[str, Any]) -> None:
    errors = sorted(compose_validator().iter_errors(compose), key=str)
    assert errors == [], [f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors]


def test_the_schema_check_can_fail(compose: dict[str, Any]) -> None:
    broken = {**compose, "services": {**compose["services"], "relay": {"imgae": "typo"}}}
    assert list(compose_validator().iter_errors(broken))


def test_every_relay_variable_is_a_real_setting_and_loads(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    environment = relay_environment(compose)
    known = {env_name(name) for name in flat_names()}
    assert set(environment) - known == set(), "compose sets variables the relay does not read"
    # Load them as the relay would, with the secret file mounted somewhere real.
    token = tmp_path / "token"
    token.write_text((DEPLOY / "compose" / "api-token.example").read_text())
    settings = load_as_the_relay(
        monkeypatch, {**environment, "SCM_RELAY_API_TOKEN_FILE": str(token)}
    )
    assert settings.api.token is not None


def test_ports_topics_and_token_agree_across_services(compose: dict[str, Any]) -> None:
    services = compose["services"]
    environment = relay_environment(compose)
    relay_port = environment["SCM_RELAY_HTTP_PORT"]
    assert f"127.0.0.1:{relay_port}:{relay_port}" in services["relay"]["ports"]

    scrape = yaml.safe_load((DEPLOY / "compose" / "prometheus.yml").read_text())
    targets = scrape["scrape_configs"][0]["static_configs"][0]["targets"]
    assert targets == [f"relay:{relay_port}"]
    assert scrape["scrape_configs"][0]["job_name"] == "scm-relay"
    rules = (DEPLOY / "prometheus" / "alerts.yml").read_text()
    assert 'job="scm-relay"' in rules, "the alerts select the job compose scrapes"

    simulator = services["simulator"]["command"]
    api_port = simulator[simulator.index("--port") + 1]
    assert environment["SCM_RELAY_API_BASE_URL"] == f"http://simulator:{api_port}"
    token = simulator[simulator.index("--token") + 1]
    assert (DEPLOY / "compose" / "api-token.example").read_text().strip() == token
    secret_name = services["relay"]["secrets"][0]
    assert environment["SCM_RELAY_API_TOKEN_FILE"] == f"/run/secrets/{secret_name}"

    kafka = services["kafka"]["environment"]
    assert f"INTERNAL://{environment['SCM_RELAY_KAFKA_BOOTSTRAP_SERVERS']}" in (
        kafka["KAFKA_ADVERTISED_LISTENERS"].split(",")
    )
    setup_script = services["kafka-setup"]["command"][0]
    created = dict(re.findall(r"--topic (\S+) (.*)", setup_script))
    for setting in ("INPUT_TOPIC", "RESULTS_TOPIC", "DLQ_TOPIC", "TASKS_TOPIC"):
        assert environment[f"SCM_RELAY_{setting}"] in created
    assert "cleanup.policy=compact" in created[environment["SCM_RELAY_TASKS_TOPIC"]]


def test_compose_publishes_ports_on_loopback_only(compose: dict[str, Any]) -> None:
    # The simulator's control endpoints and Kafka's host listener have no authentication.
    published = [
        (name, port)
        for name, service in compose["services"].items()
        for port in service.get("ports", [])
    ]
    assert published
    assert all(str(port).startswith("127.0.0.1:") for _, port in published), published


def test_the_relay_waits_for_kafka_and_its_topics_and_stops_after_draining(
    compose: dict[str, Any],
) -> None:
    relay = compose["services"]["relay"]
    assert relay["depends_on"]["kafka"]["condition"] == "service_healthy"
    assert relay["depends_on"]["kafka-setup"]["condition"] == "service_completed_successfully"
    assert relay["read_only"] is True
    environment = relay_environment(compose)
    drain_s = (
        float(environment["SCM_RELAY_SHUTDOWN_TIMEOUT_S"])
        + float(environment["SCM_RELAY_API_REQUEST_TIMEOUT_S"])
        + COMMIT_DEADLINE_S
    )
    grace = relay["stop_grace_period"]
    assert grace.endswith("s")
    assert float(grace[:-1]) > drain_s


def test_every_mounted_file_exists(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name} mounts missing {source}"
    # The secret files are made before the first `up` (git-ignored): the file says how.
    header = COMPOSE.read_text().split("\nname:", 1)[0]
    for secret in compose["secrets"].values():
        made = Path("deploy") / Path(secret["file"])
        making = rf"(> |cp \S+ ){re.escape(str(made))}\s*(#.*)?$"
        assert re.search(making, header, re.MULTILINE), f"how to make {made} is not said"
    dashboards = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "dashboards" / "scm-relay.yml").read_text()
    )
    mounted = [
        v.split(":")[1] for v in compose["services"]["grafana"]["volumes"] if v.endswith(".json:ro")
    ]
    assert all(m.startswith(dashboards["providers"][0]["options"]["path"]) for m in mounted)


def git(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["git", *args], cwd=DEPLOY, capture_output=True, text=True, timeout=30, check=False
    )


def test_the_secret_files_are_git_ignored_and_none_is_tracked(compose: dict[str, Any]) -> None:
    # A tracked token file invites committing a real token: the stack reads its secrets
    # from ignored files, and only an example (the simulator's token) is committed.
    files = [Path(secret["file"]) for secret in compose["secrets"].values()]
    assert files
    tracked = set(git("ls-files", "compose").stdout.split())
    for file in files:
        assert git("check-ignore", "--quiet", str(file)).returncode == 0, f"{file} not ignored"
        assert str(file.relative_to("compose")) not in {Path(t).name for t in tracked}
    assert "compose/api-token.example" in tracked


def test_grafana_takes_its_admin_password_from_a_secret(compose: dict[str, Any]) -> None:
    grafana = compose["services"]["grafana"]
    environment = grafana["environment"]
    assert "GF_SECURITY_ADMIN_PASSWORD" not in environment, "a password in the compose file"
    (secret,) = grafana["secrets"]
    assert environment["GF_SECURITY_ADMIN_PASSWORD__FILE"] == f"/run/secrets/{secret}"
    assert compose["secrets"][secret]["file"].startswith("./compose/")
