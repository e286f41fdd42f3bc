"""`scm-relay demo` never uses the relay's production settings: whatever SCM_RELAY_*
variables, token file or config file the environment holds, its relay talks to the
broker and the simulator the demo started on loopback, and nothing else."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from devkit import demo
from tests.settings_support import clear_relay_environment

PRODUCTION_TOKEN = "uat-production-0a1b2c3d"
PRODUCTION_PASSWORD = "production-sasl-secret"


def production_environment(tmp_path: Path, address: str) -> dict[str, str]:
    """What a production pod sets, with its cluster and API at `address`."""
    token_file = tmp_path / "api-token"
    token_file.write_text(PRODUCTION_TOKEN)
    config = tmp_path / "relay.toml"
    config.write_text('results_topic = "scm.results"\nbatch_max_values = 7\n')
    return {
        "SCM_RELAY_KAFKA_BOOTSTRAP_SERVERS": address,
        "SCM_RELAY_KAFKA_GROUP_ID": "scm-relay",
        "SCM_RELAY_INPUT_TOPIC": "scm.changes",
        "SCM_RELAY_DLQ_TOPIC": "scm.dlq",
        "SCM_RELAY_TASKS_TOPIC": "scm.tasks",
        "SCM_RELAY_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "SCM_RELAY_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
        "SCM_RELAY_KAFKA_SASL_USERNAME": "relay-production",
        "SCM_RELAY_KAFKA_SASL_PASSWORD": PRODUCTION_PASSWORD,
        "SCM_RELAY_API_BASE_URL": f"http://{address}",
        "SCM_RELAY_API_TOKEN_FILE": str(token_file),
        "SCM_RELAY_HTTP_HOST": "0.0.0.0",  # noqa: S104 - a production value, never bound here
        "SCM_RELAY_CONFIG": str(config),
        # The broker script's own knobs: a host other than loopback must not be taken.
        "SCM_RELAY_KAFKA_HOST": "0.0.0.0",  # noqa: S104 - never bound here
    }


def test_the_demo_relay_takes_no_setting_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    loopback = ("127.0.0.1:39092", "http://127.0.0.1:38000", "run1", 39100)
    clear_relay_environment(monkeypatch)
    clean = demo.demo_settings(*loopback)
    for name, value in production_environment(tmp_path, "kafka.prod.example:9093").items():
        monkeypatch.setenv(name, value)

    settings = demo.demo_settings(*loopback)

    assert settings == clean
    assert settings.kafka.bootstrap_servers == "127.0.0.1:39092"
    assert str(settings.api.base_url).startswith("http://127.0.0.1:38000")
    assert settings.api.token is not None
    assert settings.api.token.get_secret_value() == demo.DEMO_TOKEN
    assert settings.kafka.security_protocol == "PLAINTEXT"
    assert settings.kafka.sasl_password is None
    assert settings.operations.http_host == "127.0.0.1"
    assert settings.kafka.input_topic == "scm.changes.demo-run1"


def test_the_broker_script_gets_no_relay_setting(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    production = production_environment(tmp_path, "kafka.prod.example:9093")
    environ = {**production, "PATH": os.environ["PATH"], "SCM_RELAY_KAFKA_HEAP": "256m"}
    env = demo.broker_environment(environ)
    relay_settings = {name for name in env if name.startswith("SCM_RELAY_")}
    assert relay_settings == {"SCM_RELAY_KAFKA_HEAP", "SCM_RELAY_KAFKA_RUN_DIR"}
    assert env["SCM_RELAY_KAFKA_RUN_DIR"].endswith(".run-demo")


@pytest.fixture
def production_stand_in() -> Iterator[tuple[str, list[int]]]:
    """A loopback port standing for the production cluster and API: it counts every
    connection made to it and closes it at once."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    accepted: list[int] = []
    done = threading.Event()

    def serve() -> None:
        while not done.is_set():
            try:
                connection, _ = server.accept()
            except TimeoutError:
                continue
            accepted.append(1)
            connection.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.getsockname()[1]}", accepted
    finally:
        done.set()
        thread.join(timeout=5)
        server.close()


def test_the_demo_command_never_contacts_the_configured_cluster_or_api(
    production_stand_in: tuple[str, list[int]],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    address, accepted = production_stand_in
    environ = production_environment(tmp_path, address)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    # No java on PATH: the demo's own broker cannot start, and that is all it may say.
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))

    assert demo.main({**environ, "PATH": str(empty)}, quick=True) == 1

    assert accepted == [], "the demo connected to the production cluster or API"
    error = capsys.readouterr().err
    assert "needs Java 17" in error
    assert "SCM_RELAY_KAFKA_BOOTSTRAP_SERVERS" not in error
