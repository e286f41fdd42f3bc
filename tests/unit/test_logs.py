"""Log set-up: JSON lines, repeats limited, item lines never limited, no token; the
standard library's records and the event loop's reports formatted and redacted too."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import structlog
from aiokafka.errors import KafkaConnectionError

from service import cli
from service.logs import RepeatLimiter, configure_logging
from tests.settings_support import clear_relay_environment


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


TOKEN = "tok-log-0123456789-secret"


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """configure_logging changes process-wide state: put it back after the test."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        yield
    finally:
        structlog.reset_defaults()
        root.handlers[:] = handlers
        root.setLevel(level)


def _refuse() -> None:
    raise ConnectionError(f"broker said {TOKEN}")


@pytest.mark.parametrize("log_format", ["json", "console"])
def test_an_aiokafka_record_is_formatted_and_redacted_like_ours(
    log_format: str, capsys: pytest.CaptureFixture[str], restore_logging: None
) -> None:
    configure_logging(log_format, "INFO", [TOKEN])
    library = logging.getLogger("aiokafka.conn")
    library.warning("authentication failed for %s", TOKEN)
    try:
        _refuse()
    except ConnectionError:
        library.exception("connection lost")
    logging.getLogger("aiokafka.consumer").info("group chatter below WARNING is not ours")
    err = capsys.readouterr().err
    assert TOKEN not in err
    assert "chatter" not in err
    if log_format == "console":
        assert "authentication failed for [redacted]" in err
        assert "broker said [redacted]" in err
        return
    warning, error = (json.loads(line) for line in err.splitlines())
    assert warning["event"] == "authentication failed for [redacted]"
    assert (warning["logger"], warning["level"]) == ("aiokafka.conn", "warning")
    assert "timestamp" in warning
    assert (error["event"], error["level"]) == ("connection lost", "error")
    (raised,) = error["exception"]
    assert raised["exc_value"] == "broker said [redacted]"


async def _drop_a_failed_task() -> None:
    async def fail() -> None:
        raise RuntimeError(f"the API answered with {TOKEN}")

    task = asyncio.get_running_loop().create_task(fail())
    await asyncio.sleep(0.01)
    assert task.done()
    del task
    gc.collect()  # the task's exception was never retrieved: the loop reports it now


def test_an_unretrieved_task_exception_is_a_redacted_json_line(
    capsys: pytest.CaptureFixture[str], restore_logging: None
) -> None:
    """asyncio's own report (through the asyncio logger) of any event loop."""
    configure_logging("json", "INFO", [TOKEN])
    asyncio.run(_drop_a_failed_task())
    err = capsys.readouterr().err
    assert TOKEN not in err
    (line,) = (json.loads(line) for line in err.splitlines())
    assert line["event"].startswith("Task exception was never retrieved")
    assert "exception=RuntimeError('the API answered with [redacted]')" in line["event"]
    assert line["logger"] == "asyncio"
    assert line["exception"][0]["exc_value"] == "the API answered with [redacted]"


def test_the_relays_loop_handler_logs_through_structlog(
    capsys: pytest.CaptureFixture[str], restore_logging: None
) -> None:
    from service.logs import log_loop_exceptions

    configure_logging("json", "INFO", [TOKEN])

    async def main() -> None:
        log_loop_exceptions(asyncio.get_running_loop())
        await _drop_a_failed_task()

    asyncio.run(main())
    err = capsys.readouterr().err
    assert TOKEN not in err
    (line,) = (json.loads(line) for line in err.splitlines())
    assert line["event"] == "event_loop_exception"
    assert line["problem"] == "Task exception was never retrieved"
    assert "[redacted]" in line["future"]
    assert line["exception"][0]["exc_value"] == "the API answered with [redacted]"


async def _kafka_fails(*_args: Any, **_kwargs: Any) -> AsyncIterator[Any]:
    raise KafkaConnectionError(f"SASL authentication failed with password {TOKEN}")
    yield  # an async generator, as the readers are


async def _kafka_fails_at_once(*_args: Any, **_kwargs: Any) -> int:
    raise KafkaConnectionError(f"SASL authentication failed with password {TOKEN}")


@pytest.mark.parametrize(
    ("argv", "target", "replacement"),
    [
        (["dlq", "list"], "service.tools.dlq.read_dead_letters", _kafka_fails),
        (["tasks", "list"], "service.tools.tasks.read_views", _kafka_fails_at_once),
    ],
)
def test_a_tools_kafka_error_is_printed_redacted(
    argv: list[str],
    target: str,
    replacement: Any,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    restore_logging: None,
) -> None:
    """The error message of a Kafka failure (it may quote a credential) is redacted."""
    clear_relay_environment(monkeypatch)
    monkeypatch.setenv("SCM_RELAY_KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("SCM_RELAY_KAFKA_SASL_MECHANISM", "SCRAM-SHA-512")
    monkeypatch.setenv("SCM_RELAY_KAFKA_SASL_USERNAME", "relay")
    monkeypatch.setenv("SCM_RELAY_KAFKA_SASL_PASSWORD", TOKEN)
    monkeypatch.setattr(target, replacement)
    assert cli.main(argv) == 3
    err = capsys.readouterr().err
    assert "Kafka failed (KafkaConnectionError: " in err
    assert "password [redacted]" in err
    assert TOKEN not in err
