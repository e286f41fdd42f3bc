"""A broker the harness started is stopped again even when asking for its
address fails (the demo's and the bench's own broker code stopped it then: the
address was asked inside their try/finally)."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from devkit import harness


async def test_a_started_broker_whose_address_fails_is_stopped(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    actions: list[str] = []

    def kafka_local(
        _run_dir: Path | None, *args: str, **_: Any
    ) -> subprocess.CompletedProcess[str]:
        actions.append(args[0])
        code = 1 if args[0] == "address" else 0
        return subprocess.CompletedProcess(list(args), code, "", "no address")

    monkeypatch.setattr(harness, "kafka_local", kafka_local)
    with pytest.raises(harness.BrokerError):
        async with harness.local_broker(tmp_path):
            pass
    assert actions[:2] == ["start", "address"]
    assert "stop" in actions, "the broker started and was left running"
