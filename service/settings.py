"""Settings: one frozen class, read from `SCM_RELAY_*` environment variables.

Precedence, highest first: environment variables, the TOML file named by
`SCM_RELAY_CONFIG` (keys are the setting names in lower case, without the
prefix), then the defaults below. docs/settings.md lists every setting; a test
keeps the two in step. Only the composition root and the CLI call
`load_settings()`.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AnyHttpUrl,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from service.core.contract import DEFAULT_LIMITS, ContractLimits

ENV_PREFIX = "SCM_RELAY_"
CONFIG_FILE_ENV = "SCM_RELAY_CONFIG"
# The TOML file of the current load_settings() call; a ContextVar because pydantic
# asks for the sources in a classmethod that takes no arguments.
_config_file: ContextVar[Path | None] = ContextVar("scm_relay_config_file", default=None)


class SettingsError(Exception):
    """Settings that cannot start the service; the message names each bad setting."""


class Settings(BaseSettings):
    """Every knob of scm-relay, validated at start-up."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        case_sensitive=False,
        frozen=True,
        extra="forbid",
        validate_default=True,
    )

    # Kafka
    kafka_bootstrap_servers: str = Field(default="localhost:9092", min_length=1)
    kafka_group_id: str = Field(default="scm-relay", min_length=1)
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_ssl_cafile: Path | None = None
    kafka_transactional_id: str | None = Field(default=None, min_length=1)
    input_topic: str = Field(default="scm.changes", min_length=1)
    results_topic: str = Field(default="scm.results", min_length=1)
    dlq_topic: str = Field(default="scm.dlq", min_length=1)
    tasks_topic: str = Field(default="scm.tasks", min_length=1)

    # Scantrust API
    api_base_url: AnyHttpUrl = AnyHttpUrl("https://api.scantrust.com")
    api_token: SecretStr | None = None
    api_token_file: Path | None = None
    api_ca_file: Path | None = None
    api_connect_timeout_s: float = Field(default=5.0, gt=0, le=300)
    api_request_timeout_s: float = Field(default=30.0, gt=0, le=600)
    api_max_connections: int = Field(default=10, ge=1, le=1000)
    api_max_response_bytes: int = Field(default=1 << 20, ge=1024, le=64 << 20)
    api_rate_per_min: int = Field(default=3000, ge=1, le=1_000_000)
    api_retry_initial_s: float = Field(default=0.5, gt=0, le=60)
    api_retry_max_backoff_s: float = Field(default=30.0, gt=0, le=3600)
    api_retry_max_elapsed_s: float = Field(default=120.0, ge=0, le=86_400)
    api_breaker_failures: int = Field(default=5, ge=1, le=1000)
    api_breaker_cooldown_s: float = Field(default=30.0, ge=0, le=3600)
    api_status_chunk_size: int = Field(default=100, ge=1, le=1000)

    # Batching
    batch_max_values: int = Field(default=1000, ge=1, le=1000)
    batch_max_keys: int = Field(default=1, ge=1, le=5)
    batch_linger_ms: int = Field(default=1000, ge=0, le=600_000)
    upload_rate_per_s: float = Field(default=10.0, gt=0, le=1000)
    max_in_flight_requests: int = Field(default=4, ge=1, le=100)
    max_open_batches: int = Field(default=1000, ge=1, le=100_000)
    max_buffered_values: int = Field(default=200_000, ge=1000, le=10_000_000)
    max_unfinished_tasks: int = Field(default=200, ge=1, le=100_000)
    shutdown_timeout_s: float = Field(default=30.0, ge=0, le=3600)
    rebalance_timeout_s: float = Field(default=20.0, ge=0, le=3600)

    # Task tracking
    poll_initial_s: float = Field(default=1.0, gt=0, le=3600)
    poll_factor: float = Field(default=1.5, ge=1, le=10)
    poll_max_s: float = Field(default=30.0, gt=0, le=3600)
    task_stuck_after_s: float = Field(default=900.0, gt=0, le=7 * 86_400)

    # Event contract limits
    max_record_bytes: int = Field(default=DEFAULT_LIMITS.max_record_bytes, ge=1024, le=64 << 20)
    max_values_per_event: int = Field(
        default=DEFAULT_LIMITS.max_values_per_event, ge=1, le=10_000_000
    )
    max_scm_data_keys: int = Field(default=DEFAULT_LIMITS.max_scm_data_keys, ge=1, le=10_000)
    max_key_length: int = Field(default=DEFAULT_LIMITS.max_key_length, ge=1, le=10_000)
    max_value_length: int = Field(default=DEFAULT_LIMITS.max_value_length, ge=1, le=1_000_000)
    max_reference_length: int = Field(default=DEFAULT_LIMITS.max_reference_length, ge=1, le=10_000)
    max_event_id_length: int = Field(default=DEFAULT_LIMITS.max_event_id_length, ge=1, le=10_000)
    one_code_per_value_keys: Annotated[frozenset[str], NoDecode] = (
        DEFAULT_LIMITS.one_code_per_value_keys
    )

    # Operations
    http_port: int = Field(default=8080, ge=0, le=65535)
    http_host: str = Field(default="0.0.0.0", min_length=1)  # noqa: S104 - served in a pod
    log_format: Literal["auto", "json", "console"] = "auto"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @field_validator("one_code_per_value_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: Any) -> Any:
        """Accept `rfid,case_id` from the environment as well as a TOML list."""
        if isinstance(value, str):
            return frozenset(part.strip() for part in value.split(",") if part.strip())
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @model_validator(mode="before")
    @classmethod
    def _token_from_file(cls, data: Any) -> Any:
        """Read the token from `api_token_file` (e.g. a mounted secret) when one is named."""
        if not isinstance(data, dict) or not data.get("api_token_file"):
            return data
        if data.get("api_token"):
            raise ValueError("set SCM_RELAY_API_TOKEN or SCM_RELAY_API_TOKEN_FILE, not both")
        path = Path(data["api_token_file"])
        try:
            token = path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ValueError(
                f"SCM_RELAY_API_TOKEN_FILE {str(path)!r} cannot be read: {exc.strerror}"
            ) from exc
        if not token:
            raise ValueError(f"SCM_RELAY_API_TOKEN_FILE {str(path)!r} is empty")
        return {**data, "api_token": token}

    @model_validator(mode="after")
    def _sasl_complete(self) -> Settings:
        if self.kafka_security_protocol.startswith("SASL_") and not (
            self.kafka_sasl_mechanism and self.kafka_sasl_username and self.kafka_sasl_password
        ):
            raise ValueError(
                "SCM_RELAY_KAFKA_SECURITY_PROTOCOL is SASL: set SCM_RELAY_KAFKA_SASL_MECHANISM, "
                "SCM_RELAY_KAFKA_SASL_USERNAME and SCM_RELAY_KAFKA_SASL_PASSWORD"
            )
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_file = _config_file.get()
        if config_file is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=config_file))
        return tuple(sources)

    def contract_limits(self) -> ContractLimits:
        """The event-contract limits these settings set."""
        return ContractLimits(
            max_record_bytes=self.max_record_bytes,
            max_values_per_event=self.max_values_per_event,
            max_scm_data_keys=self.max_scm_data_keys,
            max_key_length=self.max_key_length,
            max_value_length=self.max_value_length,
            max_reference_length=self.max_reference_length,
            max_event_id_length=self.max_event_id_length,
            one_code_per_value_keys=self.one_code_per_value_keys,
        )


def env_name(field: str) -> str:
    """The environment variable of a setting."""
    return f"{ENV_PREFIX}{field.upper()}"


def load_settings(environ: Mapping[str, str], **overrides: Any) -> Settings:
    """Build the settings, or raise `SettingsError` naming every bad setting and why.

    `environ` supplies `SCM_RELAY_CONFIG`; the settings themselves are read from
    the process environment by pydantic-settings.
    """
    config_path = environ.get(CONFIG_FILE_ENV)
    config_file: Path | None = None
    if config_path:
        config_file = Path(config_path)
        if not config_file.is_file():
            raise SettingsError(f"{CONFIG_FILE_ENV}: {config_path!r} is not a readable file")
    token = _config_file.set(config_file)
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise SettingsError(_describe(exc)) from None
    except ValueError as exc:  # a TOML syntax error surfaces here
        raise SettingsError(f"{CONFIG_FILE_ENV}: {config_path!r}: {exc}") from None
    finally:
        _config_file.reset(token)


def _describe(error: ValidationError) -> str:
    lines = []
    for problem in error.errors(include_url=False):
        location = problem["loc"]
        message = problem["msg"].removeprefix("Value error, ")
        if location:
            name = env_name(str(location[0]))
            shown = "" if "password" in name or "token" in name else _shown_input(problem)
            lines.append(f"{name}: {message}{shown}")
        else:
            lines.append(message)
    return "invalid settings:\n  " + "\n  ".join(lines)


def _shown_input(problem: Mapping[str, Any]) -> str:
    value = problem.get("input")
    if value is None or isinstance(value, dict):
        return ""
    return f" (got {str(value)[:80]!r})"
