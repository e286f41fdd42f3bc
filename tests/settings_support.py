"""Loading settings in tests exactly as the relay does: from the process environment."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping

import pytest
from structlog.testing import capture_logs

from service.settings import ENV_PREFIX, Settings, load_settings


def clear_relay_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No SCM_RELAY_* variable of the developer's shell leaks into a test."""
    for name in list(os.environ):
        if name.startswith(ENV_PREFIX):
            monkeypatch.delenv(name)


def load_as_the_relay(monkeypatch: pytest.MonkeyPatch, environment: Mapping[str, str]) -> Settings:
    """The settings a relay started with exactly `environment` would run with."""
    clear_relay_environment(monkeypatch)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    return load_settings({})


async def start_warnings(
    monkeypatch: pytest.MonkeyPatch, environment: Mapping[str, str]
) -> list[str]:
    """Start the relay against a closed Kafka port (it gives up at once); its warnings."""
    settings = load_as_the_relay(
        monkeypatch,
        {
            "SCM_RELAY_API_TOKEN": "t",
            "SCM_RELAY_KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1",
            "SCM_RELAY_KAFKA_STARTUP_WAIT_S": "0",
            "SCM_RELAY_HTTP_HOST": "127.0.0.1",
            "SCM_RELAY_HTTP_PORT": "0",
            **environment,
        },
    )
    from service.app import EXIT_FAILED, run_relay

    with capture_logs() as logs:
        code = await asyncio.wait_for(run_relay(settings, asyncio.Event()), timeout=60)
    assert code == EXIT_FAILED
    return [
        f"{entry['setting']}: {entry['risk']}"
        for entry in logs
        if entry["event"] == "security_weakened_by_setting" and entry["log_level"] == "warning"
    ]
