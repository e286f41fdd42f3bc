"""Log set-up: JSON lines, repeats limited, item lines never limited, no token."""

from __future__ import annotations

import json

import pytest
import structlog

from service.logs import RepeatLimiter, configure_logging


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_repeats_are_suppressed_then_counted() -> None:
    clock = Clock()
    limiter = RepeatLimiter(window_s=10, clock=clock)
    line = {"event": "api_auth_failed", "endpoint": "upload", "status": 403}
    assert limiter(None, "error", dict(line)) == line
    for _ in range(5):
        clock.now += 1
        with pytest.raises(structlog.DropEvent):
            limiter(None, "error", dict(line))
    other = {"event": "api_auth_failed", "endpoint": "tasks_bulk", "status": 403}
    assert limiter(None, "error", dict(other)) == other
    clock.now = 11
    assert limiter(None, "error", dict(line)) == {**line, "repeated": 5}


def test_item_lines_and_info_lines_are_never_limited() -> None:
    limiter = RepeatLimiter(window_s=10, clock=Clock())
    invalid = {"event": "event_invalid", "reason": "invalid_json", "offset": 1}
    for offset in range(3):
        assert limiter(None, "warning", {**invalid, "offset": offset})
    for _ in range(3):
        assert limiter(None, "info", {"event": "intake_resumed"})


def test_json_lines_on_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    try:
        configure_logging("json", "INFO")
        structlog.get_logger("t").info("batch_submitted", batch_id="b-1", values=3)
        structlog.get_logger("t").debug("hidden")
    finally:
        structlog.reset_defaults()
    (line,) = capsys.readouterr().err.splitlines()
    record = json.loads(line)
    assert (record["event"], record["batch_id"], record["level"]) == (
        "batch_submitted",
        "b-1",
        "info",
    )
    assert "timestamp" in record
