"""Loading settings in tests exactly as the relay does: from the process environment."""

from __future__ import annotations

import os
from collections.abc import Mapping

import pytest

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
