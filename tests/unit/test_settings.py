"""Settings: defaults, environment, config file, token file, and errors that name the setting."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from devkit import settings_reference
from service.settings import (
    OperationsSettings,
    SettingsError,
    env_name,
    flat_names,
    load_settings,
)
from tests.settings_support import clear_relay_environment

DOCS = Path(__file__).resolve().parents[2] / "docs" / "settings.md"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No SCM_RELAY_* variable of the developer's shell leaks into these tests."""
    clear_relay_environment(monkeypatch)


def test_defaults_match_the_design() -> None:
    settings = load_settings({})
    assert settings.kafka.bootstrap_servers == "localhost:9092"
    assert settings.kafka.group_id == "scm-relay"
    assert (settings.kafka.input_topic, settings.kafka.results_topic) == (
        "scm.changes",
        "scm.results",
    )
    assert (settings.kafka.dlq_topic, settings.kafka.tasks_topic) == ("scm.dlq", "scm.tasks")
    assert str(settings.api.base_url) == "https://api.scantrust.com/"
    assert (settings.batching.batch_max_values, settings.batching.batch_max_keys) == (1000, 1)
    assert settings.api.upload_rate_per_s == 10
    assert settings.operations.http_port == 8080
    assert settings.api.token is None


def test_environment_variables_set_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SCM_RELAY_BATCH_MAX_VALUES", "500")
    monkeypatch.setenv("SCM_RELAY_LOG_LEVEL", "debug")
    monkeypatch.setenv("SCM_RELAY_ONE_CODE_PER_VALUE_KEYS", "rfid, case_id,")
    monkeypatch.setenv("SCM_RELAY_MAX_VALUES_PER_EVENT", "7")
    monkeypatch.setenv("SCM_RELAY_BATCH_MAX_BYTES", "100000")
    settings = load_settings({})
    assert settings.batching.batch_max_values == 500
    assert settings.operations.log_level == "DEBUG"
    limits = settings.limits
    assert limits.one_code_per_value_keys == frozenset({"rfid", "case_id"})
    assert limits.max_values_per_event == 7
    # An event with several constraint keys must fit one request of these bounds.
    assert (limits.batch_max_values, limits.batch_max_bytes) == (500, 100_000)


@pytest.mark.parametrize(
    ("name", "value", "fragment"),
    [
        ("SCM_RELAY_BATCH_MAX_VALUES", "5000", "less than or equal to 1000"),
        ("SCM_RELAY_BATCH_MAX_KEYS", "6", "less than or equal to 5"),
        ("SCM_RELAY_BATCH_LINGER_MS", "soon", "valid integer"),
        ("SCM_RELAY_UPLOAD_RATE_PER_S", "0", "greater than 0"),
        ("SCM_RELAY_HTTP_PORT", "70000", "less than or equal to 65535"),
        ("SCM_RELAY_LOG_FORMAT", "xml", "'auto', 'json' or 'console'"),
        ("SCM_RELAY_API_BASE_URL", "not a url", "URL"),
        ("SCM_RELAY_KAFKA_SECURITY_PROTOCOL", "TLS", "PLAINTEXT"),
    ],
)
def test_a_bad_value_names_the_setting_and_why(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, fragment: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError) as raised:
        load_settings({})
    message = str(raised.value)
    assert f"{name}: " in message
    assert fragment in message
    assert repr(value) in message


def test_sasl_needs_mechanism_and_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SCM_RELAY_KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    with pytest.raises(SettingsError, match="SCM_RELAY_KAFKA_SASL_MECHANISM"):
        load_settings({})
    monkeypatch.setenv("SCM_RELAY_KAFKA_SASL_MECHANISM", "SCRAM-SHA-512")
    monkeypatch.setenv("SCM_RELAY_KAFKA_SASL_USERNAME", "relay")
    monkeypatch.setenv("SCM_RELAY_KAFKA_SASL_PASSWORD", "pw-secret")
    settings = load_settings({})
    assert settings.kafka.sasl_password is not None
    assert "pw-secret" not in repr(settings)


def test_tls_files_without_a_tls_protocol_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SCM_RELAY_KAFKA_SSL_CAFILE", "/etc/kafka-ca.pem")
    with pytest.raises(SettingsError, match="SCM_RELAY_KAFKA_SSL_CAFILE set but"):
        load_settings({})
    monkeypatch.setenv("SCM_RELAY_KAFKA_SECURITY_PROTOCOL", "SSL")
    assert load_settings({}).kafka.ssl_cafile is not None


def test_a_client_key_needs_its_certificate(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SCM_RELAY_KAFKA_SECURITY_PROTOCOL", "SSL")
    monkeypatch.setenv("SCM_RELAY_KAFKA_SSL_KEYFILE", "/etc/client.key")
    with pytest.raises(SettingsError, match="need SCM_RELAY_KAFKA_SSL_CERTFILE"):
        load_settings({})
    monkeypatch.setenv("SCM_RELAY_KAFKA_SSL_CERTFILE", "/etc/client.pem")
    assert load_settings({}).kafka.ssl_keyfile is not None


def test_token_is_secret_and_never_in_repr_or_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SCM_RELAY_API_TOKEN", "tok-123-secret")
    settings = load_settings({})
    assert settings.api.token is not None
    assert settings.api.token.get_secret_value() == "tok-123-secret"
    assert "tok-123-secret" not in repr(settings)
    assert "tok-123-secret" not in str(settings.model_dump())
    monkeypatch.setenv("SCM_RELAY_HTTP_PORT", "-1")
    with pytest.raises(SettingsError) as raised:
        load_settings({})
    assert "tok-123-secret" not in str(raised.value)


def test_token_from_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("file-token\n")
    monkeypatch.setenv("SCM_RELAY_API_TOKEN_FILE", str(token_file))
    settings = load_settings({})
    assert settings.api.token is not None
    assert settings.api.token.get_secret_value() == "file-token"


@pytest.mark.parametrize(("content", "fragment"), [(None, "cannot be read"), ("  \n", "is empty")])
def test_unusable_token_file_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, content: str | None, fragment: str
) -> None:
    token_file = tmp_path / "token"
    if content is not None:
        token_file.write_text(content)
    monkeypatch.setenv("SCM_RELAY_API_TOKEN_FILE", str(token_file))
    with pytest.raises(SettingsError, match=rf"SCM_RELAY_API_TOKEN_FILE .* {fragment}"):
        load_settings({})


def test_token_and_token_file_together_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("a")
    monkeypatch.setenv("SCM_RELAY_API_TOKEN_FILE", str(token_file))
    monkeypatch.setenv("SCM_RELAY_API_TOKEN", "b")
    with pytest.raises(SettingsError, match="not both"):
        load_settings({})


def test_config_file_sets_values_and_environment_wins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "relay.toml"
    config.write_text('batch_linger_ms = 250\ninput_topic = "factory.scm"\nhttp_port = 9000\n')
    monkeypatch.setenv("SCM_RELAY_HTTP_PORT", "9100")
    settings = load_settings({"SCM_RELAY_CONFIG": str(config)})
    assert settings.batching.batch_linger_ms == 250
    assert settings.kafka.input_topic == "factory.scm"
    assert settings.operations.http_port == 9100


def test_config_file_problems_are_clear(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match=r"SCM_RELAY_CONFIG: .* is not a readable file"):
        load_settings({"SCM_RELAY_CONFIG": str(tmp_path / "missing.toml")})
    typo = tmp_path / "typo.toml"
    typo.write_text("batch_max_valuse = 10\n")
    with pytest.raises(SettingsError, match="SCM_RELAY_BATCH_MAX_VALUSE: Extra inputs"):
        load_settings({"SCM_RELAY_CONFIG": str(typo)})
    broken = tmp_path / "broken.toml"
    broken.write_text("batch_max_values = \n")
    with pytest.raises(SettingsError, match="SCM_RELAY_CONFIG"):
        load_settings({"SCM_RELAY_CONFIG": str(broken)})


@pytest.mark.parametrize(
    ("table", "example"),
    [
        ('[api]\ntoken_file = "{secret}"\n', "api_"),
        ('[api]\ntoken = "t0ken"\ntoken_file = "{secret}"\n', "api_"),
        ("[batching]\nbatch_max_bytes = 5000\n", "batch_"),
        ('api = "whole"\napi_token = "t0ken"\n', "api_"),
    ],
)
def test_a_config_file_table_named_after_a_section_is_refused(
    tmp_path: Path, table: str, example: str
) -> None:
    """A section's table would skip what the flat names go through: the token's file
    read (the relay would then call the token missing), "one or the other", and the
    request bounds kept in step (an error naming no setting)."""
    secret = tmp_path / "token"
    secret.write_text("t0ken-from-file\n")
    config = tmp_path / "relay.toml"
    config.write_text(table.format(secret=secret))
    section = re.split(r"[]\s=]", table.lstrip("["), maxsplit=1)[0]
    with pytest.raises(SettingsError) as refused:
        load_settings({"SCM_RELAY_CONFIG": str(config)})
    message = str(refused.value)
    assert message.startswith("SCM_RELAY_CONFIG: "), message
    assert f"[{section}] is not read" in message, message
    assert f"(e.g. {example}" in message, message


def test_settings_are_frozen() -> None:
    settings = load_settings({})
    with pytest.raises(ValueError, match="frozen"):
        settings.operations.http_port = 1  # type: ignore[misc]
    with pytest.raises(ValueError, match="frozen"):
        settings.operations = OperationsSettings()  # type: ignore[misc]


def test_docs_settings_md_is_generated_from_the_class() -> None:
    assert DOCS.read_text() == settings_reference.render(), (
        "docs/settings.md is out of date: run `make settings-doc`"
    )


def test_the_reference_lists_every_setting_and_tooling_names_no_setting() -> None:
    documented = set(re.findall(r"`(SCM_RELAY_[A-Z0-9_]+)`", settings_reference.render()))
    settings = {env_name(name) for name in flat_names()}
    assert settings <= documented
    assert not settings & set(settings_reference.TOOLING)
    assert documented - settings - set(settings_reference.TOOLING) == set()


def test_a_setting_without_a_description_cannot_be_rendered(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    field = OperationsSettings.model_fields["http_port"]
    monkeypatch.setattr(field, "description", None)
    with pytest.raises(ValueError, match="http_port has no description"):
        settings_reference.render()


def test_record_bounds_are_cut_to_the_topics_limits() -> None:
    from service.app import fitted_to_record_limits
    from service.relay.config import RelayConfig

    config = RelayConfig.of(
        load_settings(
            {},
            api_token="t",
            input_topic="in",
            results_topic="out",
            dlq_topic="dlq",
            tasks_topic="tasks",
            kafka_group_id="g",
        )
    )
    assert fitted_to_record_limits(config, {}) == config
    small = fitted_to_record_limits(config, {"dlq": 200_000, "tasks": 400_000})
    assert small.dead_letter_max_bytes == 200_000 - 16 * 1024
    assert small.dead_letter_prefix_bytes <= small.dead_letter_max_bytes // 2
    assert small.batching.batch_max_bytes == 400_000 - 256 * 1024
    # The contract refuses an event with several keys (never split) over the cut bound.
    assert small.limits.batch_max_bytes == small.batching.batch_max_bytes
    large = fitted_to_record_limits(config, {"dlq": 8 << 20, "tasks": 8 << 20, "out": 8 << 20})
    assert large == config, "the producer's 1 MiB bounds what larger topics allow"


def test_the_relay_takes_its_sections_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    from service.relay.config import RelayConfig

    monkeypatch.setenv("SCM_RELAY_KAFKA_GROUP_ID", "factory-relay")
    monkeypatch.setenv("SCM_RELAY_API_REQUEST_TIMEOUT_S", "12")
    monkeypatch.setenv("SCM_RELAY_BATCH_LINGER_MS", "250")
    monkeypatch.setenv("SCM_RELAY_POLL_MAX_S", "7")
    monkeypatch.setenv("SCM_RELAY_MAX_KEY_LENGTH", "64")
    settings = load_settings({})
    config = RelayConfig.of(settings)
    assert config.kafka is settings.kafka
    assert config.kafka.group_id == "factory-relay"
    assert config.api is settings.api
    assert config.batching is settings.batching
    assert config.tracking.poll_max_s == 7
    assert config.limits is settings.limits
    assert config.limits.max_key_length == 64
    # Derived once, here: both follow the API's request timeout.
    assert (config.upload_grace_s, config.reconcile_after_s) == (12, 12)
    assert config.batch_linger_s == 0.25


def test_a_bad_request_bound_is_reported_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """The limits take the request bounds from the batching settings: one bad value
    is one line, naming the setting, not one more for the limits' copy."""
    monkeypatch.setenv("SCM_RELAY_BATCH_MAX_VALUES", "soon")
    with pytest.raises(SettingsError) as raised:
        load_settings({})
    lines = str(raised.value).splitlines()[1:]
    assert len(lines) == 1, lines
    assert lines[0].strip().startswith("SCM_RELAY_BATCH_MAX_VALUES: Input should be a valid")


def test_whole_sections_keep_the_request_bounds_in_step() -> None:
    from service.settings import BatchingSettings

    with pytest.raises(SettingsError, match=r"limits\.batch_max_values must equal batching"):
        load_settings({}, batching=BatchingSettings(batch_max_values=5))


def test_each_setting_is_read_from_its_own_variable_in_any_case(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("scm_relay_kafka_bootstrap_servers", "kafka-1:9092")
    monkeypatch.setenv("SCM_RELAY_UPLOAD_RATE_PER_S", "4")
    monkeypatch.setenv("SCM_RELAY_API_RATE_PER_MIN", "600")
    monkeypatch.setenv("SCM_RELAY_BOOTSTRAP_SERVERS", "not-a-setting:1")  # the short name
    monkeypatch.setenv("SCM_RELAY_KAFKA", "{}")  # a section's name is no variable
    settings = load_settings({})
    assert settings.kafka.bootstrap_servers == "kafka-1:9092"
    assert (settings.api.upload_rate_per_s, settings.api.rate_per_min) == (4, 600)


def test_the_client_needs_the_token_its_section_may_lack() -> None:
    from service.scantrust.client import ScantrustClient
    from service.settings import ApiSettings

    with pytest.raises(
        SettingsError, match=re.escape("SCM_RELAY_API_TOKEN (or SCM_RELAY_API_TOKEN_FILE)")
    ):
        ScantrustClient(ApiSettings())
