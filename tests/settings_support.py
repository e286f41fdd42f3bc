"""Loading settings in tests exactly as the relay does: from the process environment."""

from __future__ import annotations

import asyncio
import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import pytest
from pydantic import BaseModel
from structlog.testing import capture_logs

from service.core.contract_limits import DEFAULT_LIMITS
from service.relay.config import RelayConfig
from service.settings import (
    ENV_PREFIX,
    ApiSettings,
    BatchingSettings,
    KafkaSettings,
    Settings,
    TrackingSettings,
    load_settings,
)


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


def relay_config(**values: Any) -> RelayConfig:
    """A relay config for tests, from flat names: an attribute of one of the relay's
    sections (`max_in_flight_requests`, `poll_max_s`, ...), a field of the config
    itself, or `batch_linger_s` (the linger in seconds). The sections are not
    validated, so a test may go below a setting's floor, as the stages allow."""
    sections: dict[str, type[BaseModel]] = {
        "kafka": KafkaSettings,
        "api": ApiSettings,
        "batching": BatchingSettings,
        "tracking": TrackingSettings,
    }
    if "batch_linger_s" in values:
        values["batch_linger_ms"] = round(values.pop("batch_linger_s") * 1000)
    own = {field.name for field in dataclasses.fields(RelayConfig)}
    parts: dict[str, dict[str, Any]] = {name: {} for name in sections}
    rest: dict[str, Any] = {"limits": DEFAULT_LIMITS, "upload_grace_s": 30.0}
    for key, value in values.items():
        owners = [name for name, section in sections.items() if key in section.model_fields]
        if key in own:
            rest[key] = value
        elif len(owners) == 1:
            parts[owners[0]][key] = value
        else:
            raise TypeError(f"{key} is no setting of the relay's sections")
    return RelayConfig(
        kafka=KafkaSettings.model_construct(**parts["kafka"]),
        api=ApiSettings.model_construct(**parts["api"]),
        batching=BatchingSettings.model_construct(**parts["batching"]),
        tracking=TrackingSettings.model_construct(**parts["tracking"]),
        **rest,
    )
