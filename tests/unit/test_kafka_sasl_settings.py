"""SASL settings: PLAIN never in clear text unless allowed (and then warned about at every
start); the password from a file, read at start and read again when it changes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import structlog
from structlog.testing import capture_logs

from service.settings import SettingsError
from tests.settings_support import clear_relay_environment, load_as_the_relay, start_warnings

SECRET = "kafka-pw-0123456789"
SASL = {
    "SCM_RELAY_KAFKA_SASL_USERNAME": "relay",
    "SCM_RELAY_KAFKA_SASL_MECHANISM": "PLAIN",
    "SCM_RELAY_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
}


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    clear_relay_environment(monkeypatch)


def test_plain_over_a_plaintext_connection_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(SettingsError) as raised:
        load_as_the_relay(monkeypatch, {**SASL, "SCM_RELAY_KAFKA_SASL_PASSWORD": SECRET})
    message = str(raised.value)
    assert "PLAIN over SCM_RELAY_KAFKA_SECURITY_PROTOCOL SASL_PLAINTEXT" in message
    assert "SCM_RELAY_KAFKA_ALLOW_PLAINTEXT_SASL=true" in message
    assert SECRET not in message


@pytest.mark.parametrize(
    "change",
    [
        {"SCM_RELAY_KAFKA_ALLOW_PLAINTEXT_SASL": "true"},
        {"SCM_RELAY_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512"},
        {"SCM_RELAY_KAFKA_SECURITY_PROTOCOL": "SASL_SSL"},
    ],
)
def test_tls_scram_or_the_explicit_setting_are_accepted(
    change: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = load_as_the_relay(
        monkeypatch, {**SASL, "SCM_RELAY_KAFKA_SASL_PASSWORD": SECRET, **change}
    )
    assert settings.kafka.sasl_password is not None


async def test_every_start_with_plain_in_clear_text_warns(monkeypatch: pytest.MonkeyPatch) -> None:
    allowed = {
        **SASL,
        "SCM_RELAY_KAFKA_SASL_PASSWORD": SECRET,
        "SCM_RELAY_KAFKA_ALLOW_PLAINTEXT_SASL": "true",
    }
    for _ in range(2):
        assert await start_warnings(monkeypatch, allowed) == [
            "SCM_RELAY_KAFKA_ALLOW_PLAINTEXT_SASL: the Kafka SASL password goes in clear text "
            "(PLAIN over SASL_PLAINTEXT) to 127.0.0.1:1"
        ]
    scram = {**allowed, "SCM_RELAY_KAFKA_SASL_MECHANISM": "SCRAM-SHA-256"}
    assert await start_warnings(monkeypatch, scram) == []


def test_the_password_from_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    password_file = tmp_path / "password"
    password_file.write_text(f"{SECRET}\n")
    settings = load_as_the_relay(
        monkeypatch,
        {
            **SASL,
            "SCM_RELAY_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
            "SCM_RELAY_KAFKA_SASL_PASSWORD_FILE": str(password_file),
        },
    )
    assert settings.kafka.sasl_password is not None
    assert settings.kafka.sasl_password.get_secret_value() == SECRET
    assert SECRET not in repr(settings)


@pytest.mark.parametrize(
    ("content", "also", "fragment"),
    [
        (None, {}, r"SCM_RELAY_KAFKA_SASL_PASSWORD_FILE '.*' cannot be read"),
        (" \n", {}, r"SCM_RELAY_KAFKA_SASL_PASSWORD_FILE '.*' is empty"),
        (
            SECRET,
            {"SCM_RELAY_KAFKA_SASL_PASSWORD": "other"},
            "set SCM_RELAY_KAFKA_SASL_PASSWORD or SCM_RELAY_KAFKA_SASL_PASSWORD_FILE, not both",
        ),
    ],
)
def test_an_unusable_password_file_is_named(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    content: str | None,
    also: dict[str, str],
    fragment: str,
) -> None:
    password_file = tmp_path / "password"
    if content is not None:
        password_file.write_text(content)
    environment = {
        **SASL,
        "SCM_RELAY_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "SCM_RELAY_KAFKA_SASL_PASSWORD_FILE": str(password_file),
        **also,
    }
    with pytest.raises(SettingsError, match=fragment) as raised:
        load_as_the_relay(monkeypatch, environment)
    assert SECRET not in str(raised.value)


def touch_later(path: Path, text: str) -> None:
    """Write `text`, with a modification time surely unlike the last one's."""
    path.write_text(text)
    stamp = path.stat().st_mtime_ns + 1_000_000_000
    os.utime(path, ns=(stamp, stamp))


async def test_a_rotated_password_file_is_read_again_and_redacted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from service.kafka import SaslPasswordFile
    from service.logs import configure_logging

    password_file = tmp_path / "password"
    password_file.write_text(SECRET)
    watched = SaslPasswordFile(password_file, SECRET)
    try:
        configure_logging("json", "INFO", [SECRET])
        assert await watched.reload() is None  # the password it started with
        touch_later(password_file, "rotated-pw-9876543210\n")
        assert await watched.reload() == "rotated-pw-9876543210"
        assert await watched.reload() is None  # unchanged since
        structlog.get_logger("t").error("quoted", text="rotated-pw-9876543210")
        touch_later(password_file, "")
        with capture_logs() as logs:
            assert await watched.reload() is None
        password_file.unlink()
        assert await watched.reload() is None
    finally:
        structlog.reset_defaults()
    assert [(e["event"], e["problem"]) for e in logs] == [
        ("kafka_sasl_password_file_unusable", "empty")
    ]
    err = capsys.readouterr().err
    assert "kafka_sasl_password_reloaded" in err
    assert "rotated-pw-9876543210" not in err
    assert "[redacted]" in err
