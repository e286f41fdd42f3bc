"""No secret reaches the output: tracebacks carry no local variables, every secret the
settings hold is redacted from every line, and a token is checked at start-up."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import structlog

from service.logs import REDACTED, configure_logging
from service.settings import SettingsError, load_settings, secrets, setting_fields
from tests.settings_support import clear_relay_environment

TOKEN = "uat-7f3c9a1e5b2d4c6e"
PASSWORD = "sasl-p4ss-w0rd-42"


def crash_holding_the_token() -> None:
    """Fails as aiohttp does when a header is refused: the token is in a local variable."""
    headers = {"Authorization": f"UAT {TOKEN}\n"}
    raise ValueError(f"Newline or carriage return character detected in {len(headers)} header")


def crash_quoting_the_token() -> None:
    """Fails with the secret in the exception's own message (as a library might)."""
    raise RuntimeError(f"cannot log in as relay with {PASSWORD!r}")


@pytest.mark.parametrize("log_format", ["json", "console"])
def test_a_crash_prints_neither_locals_nor_secrets(
    log_format: str, capsys: pytest.CaptureFixture[str]
) -> None:
    try:
        configure_logging(log_format, "INFO", secrets=[TOKEN, PASSWORD])
        log = structlog.get_logger("secrets-test")
        for crash in (crash_holding_the_token, crash_quoting_the_token):
            try:
                crash()
            except (ValueError, RuntimeError):
                log.exception("relay_crashed")
        log.error("kafka_setup_invalid", problem=f"password {PASSWORD} refused")
    finally:
        structlog.reset_defaults()
    output = capsys.readouterr().err
    assert TOKEN not in output
    assert PASSWORD not in output
    assert "relay_crashed" in output
    assert "crash_holding_the_token" in output
    assert REDACTED in output
    # The local's value as a repr would print it (the source line shows double quotes).
    assert "{'Authorization'" not in output, "a traceback printed local variables"


def test_json_crash_lines_stay_json(capsys: pytest.CaptureFixture[str]) -> None:
    try:
        configure_logging("json", "INFO", secrets=[TOKEN])
        try:
            crash_holding_the_token()
        except ValueError:
            structlog.get_logger("secrets-test").exception("relay_crashed")
    finally:
        structlog.reset_defaults()
    (line,) = capsys.readouterr().err.splitlines()
    record = json.loads(line)
    (frame_set,) = record["exception"]
    assert all("locals" not in frame for frame in frame_set["frames"])


def test_a_token_with_a_trailing_newline_is_used_without_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clear_relay_environment(monkeypatch)
    monkeypatch.setenv("SCM_RELAY_API_TOKEN", f"{TOKEN}\n")
    settings = load_settings(os.environ)
    assert settings.api.token is not None
    assert settings.api.token.get_secret_value() == TOKEN


@pytest.mark.parametrize("inside", [" ", "\t", "\x07", "\u2028"])
def test_a_token_with_white_space_or_control_characters_inside_is_refused_unquoted(
    inside: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    clear_relay_environment(monkeypatch)
    bad = f"{TOKEN[:6]}{inside}{TOKEN[6:]}"
    monkeypatch.setenv("SCM_RELAY_API_TOKEN", bad)
    with pytest.raises(SettingsError) as refused:
        load_settings(os.environ)
    message = str(refused.value)
    assert "SCM_RELAY_API_TOKEN" in message
    assert TOKEN[:6] not in message
    assert TOKEN[6:] not in message


def test_every_secret_setting_is_known_to_the_redactor(monkeypatch: pytest.MonkeyPatch) -> None:
    clear_relay_environment(monkeypatch)
    settings = load_settings(
        {},
        api_token=TOKEN,
        kafka_security_protocol="SASL_SSL",
        kafka_sasl_mechanism="PLAIN",
        kafka_sasl_username="relay",
        kafka_sasl_password=PASSWORD,
    )
    assert set(secrets(settings)) == {TOKEN, PASSWORD}
    secret_fields = {
        name
        for _section, _attribute, name, field in setting_fields()
        if "Secret" in str(field.annotation)
    }
    assert secret_fields == {"api_token", "kafka_sasl_password", "kafka_ssl_key_password"}


async def test_a_rotated_token_file_is_read_again_without_a_restart(tmp_path: Path) -> None:
    import asyncio

    from pydantic import AnyHttpUrl, SecretStr

    from service.scantrust.client import ScantrustClient
    from service.settings import ApiSettings

    seen: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        seen.extend(
            line for line in head.split(b"\r\n") if line.lower().startswith(b"authorization")
        )
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    token_file = tmp_path / "api-token"
    token_file.write_text(f"{TOKEN}\n")
    config = ApiSettings(
        base_url=AnyHttpUrl(f"http://127.0.0.1:{port}"),
        token=SecretStr(TOKEN),
        token_file=token_file,
    )
    try:
        async with ScantrustClient(config) as api:
            assert await api.reload_token() is False  # the same token as at start
            await api.me()
            token_file.write_text("rotated-token-0042\n")
            assert await api.reload_token() is True
            await api.me()
            token_file.write_text("broken token\n")
            assert await api.reload_token() is False  # refused: the rotated one stays
            await api.me()
    finally:
        server.close()
        await server.wait_closed()
    assert seen == [
        f"Authorization: UAT {TOKEN}".encode(),
        b"Authorization: UAT rotated-token-0042",
        b"Authorization: UAT rotated-token-0042",
    ]
