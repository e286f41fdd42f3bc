"""Settings: one frozen class of sections, read from `SCM_RELAY_*` environment variables.

Each section is what one part of the relay takes whole: `KafkaSettings` the Kafka
adapter (service/kafka.py), `ApiSettings` the API client, `BatchingSettings` and
`TrackingSettings` the relay's stages, `ContractLimits` (service/core) the event
contract, `OperationsSettings` the endpoints and the logs. A setting keeps its flat
name, the environment variable without its prefix (`kafka_bootstrap_servers`), as
its field's alias: `Settings` sorts flat names into their sections, so the
environment, the TOML file and `load_settings(..., name=value)` all speak them.

Precedence, highest first: environment variables, the TOML file named by
`SCM_RELAY_CONFIG` (keys are the setting names in lower case, without the
prefix), then the defaults below. docs/settings.md lists every setting; a test
keeps the two in step. Only the composition root and the CLI call
`load_settings()`.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from functools import cache
from pathlib import Path
from typing import Any, Final, Literal, Self, get_type_hints

from pydantic import (
    AnyHttpUrl,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from service.core.contract_limits import DEFAULT_LIMITS, ContractLimits

ENV_PREFIX = "SCM_RELAY_"
CONFIG_FILE_ENV = "SCM_RELAY_CONFIG"
# The TOML file of the current load_settings() call; a ContextVar because pydantic
# asks for the sources in a classmethod that takes no arguments.
_config_file: ContextVar[Path | None] = ContextVar("scm_relay_config_file", default=None)


# The contract's bounds of one request (an event with several constraint keys is one
# request, never split): settings of the batching section that the limits take too.
REQUEST_BOUNDS: Final = ("batch_max_values", "batch_max_bytes")


class SettingsError(Exception):
    """Settings that cannot start the service; the message names each bad setting."""


class _Section(BaseModel):
    """A part of the settings that one part of the relay takes whole. A field's alias,
    when it has one, is its flat name; tests and tools may give either."""

    model_config = ConfigDict(
        frozen=True, extra="forbid", validate_default=True, validate_by_name=True
    )


class KafkaSettings(_Section):
    """How the relay reaches Kafka, and its topics: what the Kafka adapter and the
    relay's stages take (the connection part is what Quix Streams calls a
    `ConnectionConfig`)."""

    bootstrap_servers: str = Field(
        validation_alias="kafka_bootstrap_servers",
        default="localhost:9092",
        min_length=1,
        description="comma-separated `host:port` list",
    )
    group_id: str = Field(
        validation_alias="kafka_group_id",
        default="scm-relay",
        min_length=1,
        description="consumer group of the relay replicas",
    )
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        validation_alias="kafka_security_protocol",
        default="PLAINTEXT",
        description="`PLAINTEXT`, `SSL`, `SASL_PLAINTEXT` or `SASL_SSL`",
    )
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = Field(
        validation_alias="kafka_sasl_mechanism",
        default=None,
        description=(
            "`PLAIN`, `SCRAM-SHA-256` or `SCRAM-SHA-512`; required with a `SASL_*` protocol"
        ),
    )
    sasl_username: str | None = Field(
        validation_alias="kafka_sasl_username",
        default=None,
        description="required with a `SASL_*` protocol",
    )
    sasl_password: SecretStr | None = Field(
        validation_alias="kafka_sasl_password",
        default=None,
        description=(
            "secret; required with a `SASL_*` protocol (or `SCM_RELAY_KAFKA_SASL_PASSWORD_FILE`);"
            " never logged"
        ),
    )
    sasl_password_file: Path | None = Field(
        validation_alias="kafka_sasl_password_file",
        default=None,
        description=(
            "read the SASL password from this file instead (e.g. a mounted secret; white space "
            "around it dropped); read again within 5 s of a change, for the next connections; "
            "setting both is an error"
        ),
    )
    allow_plaintext_sasl: bool = Field(
        validation_alias="kafka_allow_plaintext_sasl",
        default=False,
        description=(
            "accept `PLAIN` over `SASL_PLAINTEXT`: the password then crosses the network in "
            "clear text; a warning is logged at every start"
        ),
    )
    ssl_cafile: Path | None = Field(
        validation_alias="kafka_ssl_cafile",
        default=None,
        description="CA bundle (PEM) to verify the brokers",
    )
    ssl_certfile: Path | None = Field(
        validation_alias="kafka_ssl_certfile",
        default=None,
        description="client certificate (PEM, may hold the key too) for brokers that ask for one",
    )
    ssl_keyfile: Path | None = Field(
        validation_alias="kafka_ssl_keyfile",
        default=None,
        description="the client certificate's private key (PEM), when not in the certificate file",
    )
    ssl_key_password: SecretStr | None = Field(
        validation_alias="kafka_ssl_key_password",
        default=None,
        description="secret; the password of an encrypted client key; never logged",
    )
    transactional_id: str | None = Field(
        validation_alias="kafka_transactional_id",
        default=None,
        min_length=1,
        description=(
            "the producer's transactional id; give each replica a stable one (e.g. a StatefulSet "
            "pod name) to fence its zombie after a restart (docs/guarantees.md)"
        ),
        json_schema_extra={"default_doc": "group id, host name and process id"},
    )
    startup_wait_s: float = Field(
        validation_alias="kafka_startup_wait_s",
        default=600.0,
        ge=0,
        le=86_400,
        description=(
            "at start, how long to wait (not ready, retrying with backoff) for a bootstrap "
            "server to answer before exiting; a refused credential or certificate exits at once"
        ),
    )
    input_topic: str = Field(
        validation_alias="input_topic",
        default="scm.changes",
        min_length=1,
        description="change events from upstream",
    )
    results_topic: str = Field(
        validation_alias="results_topic",
        default="scm.results",
        min_length=1,
        description="one outcome per finished task",
    )
    dlq_topic: str = Field(
        validation_alias="dlq_topic",
        default="scm.dlq",
        min_length=1,
        description="refused records, original bytes plus error headers",
    )
    tasks_topic: str = Field(
        validation_alias="tasks_topic",
        default="scm.tasks",
        min_length=1,
        description="compacted ledger of unfinished tasks",
    )

    @model_validator(mode="before")
    @classmethod
    def _password_from_file(cls, data: Any) -> Any:
        """Read the SASL password from `kafka_sasl_password_file` when one is named."""
        return secret_from_file(data, "kafka_sasl_password")

    @model_validator(mode="after")
    def _sasl_complete(self) -> Self:
        if self.security_protocol.startswith("SASL_") and not (
            self.sasl_mechanism and self.sasl_username and self.sasl_password
        ):
            raise ValueError(
                "SCM_RELAY_KAFKA_SECURITY_PROTOCOL is SASL: set SCM_RELAY_KAFKA_SASL_MECHANISM, "
                "SCM_RELAY_KAFKA_SASL_USERNAME and SCM_RELAY_KAFKA_SASL_PASSWORD (or "
                "SCM_RELAY_KAFKA_SASL_PASSWORD_FILE)"
            )
        return self

    @model_validator(mode="after")
    def _no_clear_text_password(self) -> Self:
        if plain_password_in_clear(self) and not self.allow_plaintext_sasl:
            raise ValueError(
                "SCM_RELAY_KAFKA_SASL_MECHANISM PLAIN over SCM_RELAY_KAFKA_SECURITY_PROTOCOL "
                "SASL_PLAINTEXT sends the password in clear text: use SASL_SSL, or SCRAM-SHA-256 "
                "or SCRAM-SHA-512 (the password never crosses the network), or set "
                "SCM_RELAY_KAFKA_ALLOW_PLAINTEXT_SASL=true for a network you trust"
            )
        return self

    @model_validator(mode="after")
    def _tls_consistent(self) -> Self:
        tls_files = {
            "SCM_RELAY_KAFKA_SSL_CAFILE": self.ssl_cafile,
            "SCM_RELAY_KAFKA_SSL_CERTFILE": self.ssl_certfile,
            "SCM_RELAY_KAFKA_SSL_KEYFILE": self.ssl_keyfile,
            "SCM_RELAY_KAFKA_SSL_KEY_PASSWORD": self.ssl_key_password,
        }
        given = [name for name, value in tls_files.items() if value is not None]
        # A CA or certificate that is silently ignored would leave the operator
        # believing the connection is verified.
        if given and self.security_protocol not in ("SSL", "SASL_SSL"):
            raise ValueError(
                f"{', '.join(given)} set but SCM_RELAY_KAFKA_SECURITY_PROTOCOL is "
                f"{self.security_protocol}; use SSL or SASL_SSL, or unset them"
            )
        if (self.ssl_keyfile or self.ssl_key_password) and not self.ssl_certfile:
            raise ValueError(
                "SCM_RELAY_KAFKA_SSL_KEYFILE and SCM_RELAY_KAFKA_SSL_KEY_PASSWORD need "
                "SCM_RELAY_KAFKA_SSL_CERTFILE (the client certificate)"
            )
        return self


class ApiSettings(_Section):
    """How the relay calls the Scantrust API, and the account's rate limits: what the
    API client takes (and the relay's stages, for its timeouts and backoff)."""

    base_url: AnyHttpUrl = Field(
        validation_alias="api_base_url",
        default=AnyHttpUrl("https://api.scantrust.com"),
        description=(
            "staging: `https://api.staging.scantrust.io`; `https://` only (`http://` to a "
            "loopback address, or with `SCM_RELAY_API_ALLOW_INSECURE_HTTP`); no user info, "
            "query or fragment"
        ),
    )
    allow_insecure_http: bool = Field(
        validation_alias="api_allow_insecure_http",
        default=False,
        description=(
            "accept an `http://` base URL to a host other than a loopback address (a simulator "
            "in another container): the token then crosses the network in clear text; a "
            "warning is logged at every start"
        ),
    )
    token: SecretStr | None = Field(
        validation_alias="api_token",
        default=None,
        description="the UAT token; secret, never logged",
    )
    token_file: Path | None = Field(
        validation_alias="api_token_file",
        default=None,
        description=(
            "read the token from this file instead (e.g. a mounted secret); setting both is an "
            "error"
        ),
    )
    ca_file: Path | None = Field(
        validation_alias="api_ca_file",
        default=None,
        description=(
            "extra CA bundle (PEM) for the API's TLS certificate, added to the system's "
            "trusted CAs; verification (host name included) is always on"
        ),
    )
    connect_timeout_s: float = Field(
        validation_alias="api_connect_timeout_s",
        default=5.0,
        gt=0,
        le=300,
        description="seconds to open a connection (a timeout here is an outage: retried)",
    )
    request_timeout_s: float = Field(
        validation_alias="api_request_timeout_s",
        default=30.0,
        gt=0,
        le=600,
        description=(
            "seconds for a whole request and its answer (a timeout after sending is ambiguous)"
        ),
    )
    list_lag_s: float = Field(
        validation_alias="api_list_lag_s",
        default=5.0,
        ge=0,
        le=600,
        description=(
            "how long a task the API created may take to show in its task list (not "
            "documented: an assumption); a lookup that finds no task looks once more after "
            "this before the batch is sent again"
        ),
    )
    max_connections: int = Field(
        validation_alias="api_max_connections",
        default=10,
        ge=1,
        le=1000,
        description="open connections to the API",
    )
    max_response_bytes: int = Field(
        validation_alias="api_max_response_bytes",
        default=1 << 20,
        ge=1024,
        le=64 << 20,
        description="larger answers are refused",
    )
    rate_per_min: int = Field(
        validation_alias="api_rate_per_min",
        default=3000,
        ge=1,
        le=1_000_000,
        description=(
            "all requests per minute of the account (the API's user limit), shared by every "
            "replica of the consumer group by the partitions each owns"
        ),
    )
    upload_rate_per_s: float = Field(
        validation_alias="upload_rate_per_s",
        default=10.0,
        gt=0,
        le=1000,
        description=(
            "upload requests per second of the account (the API's `scm_update` limit), shared "
            "by every replica of the consumer group by the input partitions each owns"
        ),
    )
    retry_initial_s: float = Field(
        validation_alias="api_retry_initial_s",
        default=0.5,
        gt=0,
        le=60,
        description="first backoff ceiling; each retry doubles it (full jitter)",
    )
    retry_max_backoff_s: float = Field(
        validation_alias="api_retry_max_backoff_s",
        default=30.0,
        gt=0,
        le=3600,
        description="the most one backoff waits",
    )
    retry_after_max_s: float = Field(
        validation_alias="api_retry_after_max_s",
        default=300.0,
        gt=0,
        le=86_400,
        description="the longest wait a 429 or 5xx answer (`Retry-After`, or the seconds in a "
        "429 body) may impose; longer ones are cut to this",
    )
    retry_max_elapsed_s: float = Field(
        validation_alias="api_retry_max_elapsed_s",
        default=120.0,
        ge=0,
        le=86_400,
        description="a read (task status) stops retrying after this long and reports its last "
        "outcome; an upload is retried by the uploaders until it is answered or the relay stops",
    )
    breaker_failures: int = Field(
        validation_alias="api_breaker_failures",
        default=5,
        ge=1,
        le=1000,
        description="consecutive outages that open the circuit breaker",
    )
    breaker_cooldown_s: float = Field(
        validation_alias="api_breaker_cooldown_s",
        default=30.0,
        ge=0,
        le=3600,
        description="an open breaker lets one probe through after this long",
    )
    status_chunk_size: int = Field(
        validation_alias="api_status_chunk_size",
        default=100,
        ge=1,
        le=1000,
        description="task ids per bulk status request",
    )

    @field_validator("base_url")
    @classmethod
    def _base_url_is_plain(cls, url: AnyHttpUrl) -> AnyHttpUrl:
        # The token goes with every request to this URL: credentials in it would be sent
        # (and logged) beside it, and a query or fragment would be kept on no request path.
        if url.username is not None or url.password is not None:
            raise ValueError(
                "holds user info (`user:password@`); put the token in the token "
                "setting, the URL names the host only"
            )
        if url.query is not None:
            raise ValueError("holds a query (`?...`); give the scheme, host, port and path only")
        if url.fragment is not None:
            raise ValueError("holds a fragment (`#...`); give the scheme, host, port and path only")
        return url

    @model_validator(mode="after")
    def _https_unless_loopback_or_allowed(self) -> Self:
        url = self.base_url
        if url.scheme == "http" and not self.allow_insecure_http and not is_loopback(url):
            raise ValueError(
                f"SCM_RELAY_API_BASE_URL {str(url)!r} is http:// to a host that is not a "
                "loopback address: the token would cross the network in clear text; use "
                "https://, or set SCM_RELAY_API_ALLOW_INSECURE_HTTP=true for a test API "
                "on a network you trust"
            )
        return self

    @field_validator("token", mode="before")
    @classmethod
    def _token_is_one_word(cls, value: Any) -> Any:
        raw = value.get_secret_value() if isinstance(value, SecretStr) else value
        return clean_token(raw) if isinstance(raw, str) else value

    @model_validator(mode="before")
    @classmethod
    def _token_from_file(cls, data: Any) -> Any:
        """Read the token from `api_token_file` (e.g. a mounted secret) when one is named."""
        return secret_from_file(data, "api_token")


class BatchingSettings(_Section):
    """How events gather into requests, and the bounds of what the relay holds: what
    the relay's stages take (intake, the batcher, the uploaders)."""

    batch_max_values: int = Field(
        default=DEFAULT_LIMITS.batch_max_values,
        ge=1,
        le=1000,
        description=(
            "values per upload request, 1 to 1000 (the API's limit); an event with several "
            "constraint keys, one request never split, must fit (`multi_key_too_many_values`)"
        ),
    )
    batch_max_bytes: int = Field(
        default=DEFAULT_LIMITS.batch_max_bytes,
        ge=1024,
        le=768 * 1024,
        description="constraint value bytes per upload request; keeps each request and its "
        "ledger record under Kafka's 1 MiB record limit; an event with several constraint "
        "keys must fit (`multi_key_too_many_bytes`)",
    )
    batch_max_keys: int = Field(
        default=1,
        ge=1,
        le=5,
        description=(
            "constraint keys per request merged from events with one key, 1 to 5; above 1 "
            "only if your account confirms union semantics (an event with several keys is a "
            "request of its own whatever this says)"
        ),
    )
    batch_linger_ms: int = Field(
        default=1000,
        ge=0,
        le=600_000,
        description=(
            "a batch is sent when its oldest event has waited this long and an uploader is "
            "free; while all are busy it keeps filling (up to `SCM_RELAY_BATCH_MAX_VALUES`)"
        ),
    )
    max_in_flight_requests: int = Field(default=4, ge=1, le=100, description="uploads sent at once")
    max_open_batches: int = Field(
        default=1000,
        ge=1,
        le=100_000,
        description="batches being filled; past it the oldest is sent early",
    )
    max_read_ahead: int = Field(
        default=50_000,
        ge=1000,
        # At most about 170 KB of progress record (16 bitmap containers of 8 KB, base64)
        # however its done offsets are scattered: far below a topic's 1 MB max.message.bytes.
        le=1_000_000,
        description=(
            "offsets an input partition is read beyond its commit point; past it that "
            "partition pauses until the commit point moves (it bounds the partition's "
            "progress record and what the relay holds of it)"
        ),
    )
    max_buffered_values: int = Field(
        default=200_000,
        ge=1000,
        le=10_000_000,
        description=(
            "constraint values read but not yet in a recorded task; past it the input partitions "
            "pause (the consumer keeps polling)"
        ),
    )
    max_unfinished_tasks: int = Field(
        default=200,
        ge=1,
        le=100_000,
        description=(
            "unfinished tasks in the ledger; past it intake pauses until tasks finish (bounds the"
            " per-code order index: roughly 150 bytes per value of an unfinished task)"
        ),
    )
    shutdown_timeout_s: float = Field(
        default=30.0,
        ge=0,
        le=3600,
        description=(
            "on SIGTERM: how long to keep starting uploads of the flushed batches; uploads "
            "already sent then get `SCM_RELAY_API_REQUEST_TIMEOUT_S` more to finish"
        ),
    )
    rebalance_timeout_s: float = Field(
        default=20.0,
        ge=0,
        le=3600,
        description=(
            "on partitions revoked: how long to wait for in-flight uploads before dropping unsent"
            " events"
        ),
    )


class TrackingSettings(_Section):
    """How the relay follows a submitted task until it finishes: what the poller takes."""

    poll_initial_s: float = Field(
        default=1.0,
        gt=0,
        le=3600,
        description=(
            "first status check of a task after it is submitted; checks gather into one bulk "
            "request per this interval (or per `SCM_RELAY_API_STATUS_CHUNK_SIZE` tasks), so a "
            "result may come up to this much later"
        ),
    )
    poll_factor: float = Field(
        default=1.5,
        ge=1,
        le=10,
        description="each further check of an unfinished task waits this much longer",
    )
    poll_max_s: float = Field(
        default=30.0, gt=0, le=3600, description="the longest wait between two checks of a task"
    )
    task_stuck_after_s: float = Field(
        default=900.0,
        gt=0,
        le=7 * 86_400,
        description=(
            "a task unfinished this long after submission is reported stuck (and still polled)"
        ),
    )


class OperationsSettings(_Section):
    """The endpoints and the logs: what the composition root and the CLI take."""

    http_port: int = Field(
        default=8080,
        ge=0,
        le=65535,
        description="`/metrics`, `/healthz`, `/readyz` (0 picks a free port)",
    )
    http_host: str = Field(
        default="0.0.0.0",  # noqa: S104 - served in a pod
        min_length=1,
        description="address the endpoints listen on",
    )
    log_format: Literal["auto", "json", "console"] = Field(
        default="auto",
        description="`json`, `console`, or `auto`: console on a terminal, JSON otherwise",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        default="INFO", description="`DEBUG`, `INFO`, `WARNING` or `ERROR`"
    )

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value


class Settings(BaseSettings):
    """Every knob of scm-relay, validated at start-up, in the sections the parts take."""

    # The environment is read by `_FlatEnvironment` (see settings_customise_sources).
    model_config = SettingsConfigDict(
        case_sensitive=False,
        frozen=True,
        extra="forbid",
        validate_default=True,
    )

    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    api: ApiSettings = Field(default_factory=ApiSettings)
    batching: BatchingSettings = Field(default_factory=BatchingSettings)
    tracking: TrackingSettings = Field(default_factory=TrackingSettings)
    limits: ContractLimits = Field(default_factory=ContractLimits)
    operations: OperationsSettings = Field(default_factory=OperationsSettings)

    @model_validator(mode="before")
    @classmethod
    def _into_sections(cls, data: Any) -> Any:
        """Flat names (the environment's, the TOML file's) sorted into their sections;
        a key of no section stays where it is, to be refused as unknown."""
        if not isinstance(data, dict):
            return data
        places = flat_names()
        grouped: dict[str, Any] = {}
        for key, value in data.items():
            name = key.lower() if isinstance(key, str) else key
            if name not in places:
                grouped[key] = value
                continue
            for section in places[name]:
                part = grouped.setdefault(section, {})
                if not isinstance(part, dict):
                    # ValueError, not TypeError: pydantic reports it as a settings error
                    # instead of letting it escape load_settings as a traceback.
                    raise ValueError(  # noqa: TRY004 (see above)
                        f"give the section {section} whole or its settings, not both"
                    )
                part[name] = value
        return grouped

    @model_validator(mode="after")
    def _limits_take_the_request_bounds(self) -> Self:
        # The contract refuses an event with several constraint keys that does not fit one
        # request: its bounds are the batching settings (flat names set both; see
        # REQUEST_BOUNDS), and a caller giving whole sections must keep them equal.
        for name in REQUEST_BOUNDS:
            if getattr(self.limits, name) != getattr(self.batching, name):
                raise ValueError(f"limits.{name} must equal batching.{name}")
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
        sources: list[PydanticBaseSettingsSource] = [init_settings, _FlatEnvironment(settings_cls)]
        config_file = _config_file.get()
        if config_file is not None:
            sources.append(_FlatToml(settings_cls, toml_file=config_file))
        return tuple(sources)


class _FlatToml(TomlConfigSettingsSource):
    """The TOML file, read by the flat names the environment uses (docs/settings.md).
    A table or key named after a section (`[api]`, `api = ...`) is refused: its keys would
    skip the rules the flat names go through (a secret's file read, "one or the
    other", the request bounds kept in step), so it is an error, not a second way."""

    def __call__(self) -> dict[str, Any]:
        data = super().__call__()
        for key in data:
            section = str(key).lower()
            if section in Settings.model_fields:
                example = next(name for name, of in flat_names().items() if section in of)
                raise ValueError(
                    f"[{key}] is not read: the file takes the flat names of "
                    f"docs/settings.md (e.g. {example} = ...), as the environment does"
                )
        return data


def secret_from_file(data: Any, field: str) -> Any:
    """`data` with `field` read from the file `<field>_file` names, when one is named;
    ValueError naming the setting when the file is unusable or both are set."""
    file_field = f"{field}_file"
    if not isinstance(data, dict) or not data.get(file_field):
        return data
    name, file_name = env_name(field), env_name(file_field)
    if data.get(field):
        raise ValueError(f"set {name} or {file_name}, not both")
    path = Path(data[file_field])
    try:
        secret = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ValueError(f"{file_name} {str(path)!r} cannot be read: {exc.strerror}") from exc
    if not secret:
        raise ValueError(f"{file_name} {str(path)!r} is empty")
    return {**data, field: secret}


def plain_password_in_clear(kafka: KafkaSettings) -> bool:
    """Whether the SASL password crosses the network as it is (PLAIN without TLS)."""
    return kafka.security_protocol == "SASL_PLAINTEXT" and kafka.sasl_mechanism == "PLAIN"


def clean_token(raw: str) -> str:
    """The token without surrounding white space (a newline from `echo` or a Secret
    file); ValueError when white space or a control character is inside it (it cannot
    be sent in a header). The message never holds the value."""
    token = raw.strip()
    if any(char.isspace() or not char.isprintable() for char in token):
        raise ValueError(
            "holds white space or control characters inside it; set the token alone "
            "(the value is not shown)"
        )
    return token


def is_loopback(url: AnyHttpUrl) -> bool:
    """Whether the URL's host is this machine: `localhost`, 127.0.0.0/8 or ::1."""
    host = (url.host or "").strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def insecure_choices(settings: Settings) -> list[tuple[str, str]]:
    """What the settings allow that weakens the relay's security: (setting, risk) pairs
    the relay logs as warnings at every start, so that nobody forgets one is set."""
    choices = []
    base_url = settings.api.base_url
    if base_url.scheme == "http" and not is_loopback(base_url):
        choices.append(
            (
                "SCM_RELAY_API_ALLOW_INSECURE_HTTP",
                f"the API token goes in clear text to {base_url.host}",
            )
        )
    if plain_password_in_clear(settings.kafka):
        choices.append(
            (
                "SCM_RELAY_KAFKA_ALLOW_PLAINTEXT_SASL",
                "the Kafka SASL password goes in clear text (PLAIN over SASL_PLAINTEXT) to "
                f"{settings.kafka.bootstrap_servers}",
            )
        )
    return choices


def secrets(settings: Settings) -> list[str]:
    """Every secret the settings hold: none of them may reach a log line."""
    held = (settings.api.token, settings.kafka.sasl_password, settings.kafka.ssl_key_password)
    return [secret.get_secret_value() for secret in held if secret is not None]


def require_token(api: ApiSettings) -> SecretStr:
    """The API token; `SettingsError` when neither it nor its file is set (the relay
    and the tools that call the API need it, the others do not)."""
    if api.token is None:
        raise SettingsError(
            "SCM_RELAY_API_TOKEN (or SCM_RELAY_API_TOKEN_FILE) is required to call the API"
        )
    return api.token


def env_name(field: str) -> str:
    """The environment variable of a setting (by its flat name)."""
    return f"{ENV_PREFIX}{field.upper()}"


def section_fields(section: Any) -> dict[str, FieldInfo]:
    """The fields of a section: a pydantic model's, or a dataclass's (`ContractLimits`,
    whose constraints are in its annotations) read the way pydantic reads them."""
    if issubclass(section, BaseModel):
        return dict(section.model_fields)
    hints = get_type_hints(section, include_extras=True)
    return {
        field.name: FieldInfo.from_annotated_attribute(hints[field.name], field.default)
        for field in dataclasses.fields(section)
    }


def setting_fields() -> Iterator[tuple[str, str, str, FieldInfo]]:
    """(section, attribute, flat name, field) of every setting, in the order the
    sections declare them; the limits' request bounds are the batching settings,
    listed there only."""
    for section, holder in Settings.model_fields.items():
        for attribute, field in section_fields(holder.annotation).items():
            if section == "limits" and attribute in REQUEST_BOUNDS:
                continue
            alias = field.validation_alias
            yield section, attribute, alias if isinstance(alias, str) else attribute, field


@cache
def flat_names() -> dict[str, tuple[str, ...]]:
    """Each setting's flat name and the sections that take it."""
    places: dict[str, tuple[str, ...]] = {}
    for section, _attribute, name, _field in setting_fields():
        places[name] = (section, "limits") if name in REQUEST_BOUNDS else (section,)
    return places


def flat_values(settings: Settings) -> dict[str, Any]:
    """Every setting by its flat name: what `load_settings` takes back."""
    return {
        name: getattr(getattr(settings, section), attribute)
        for section, attribute, name, _field in setting_fields()
    }


class _FlatEnvironment(PydanticBaseSettingsSource):
    """`SCM_RELAY_<FLAT NAME>` of every setting, in any case, as the string it is (a
    list setting splits its own commas); `Settings` sorts them into sections."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        wanted = {env_name(name).lower(): name for name in flat_names()}
        return {
            wanted[key.lower()]: value for key, value in os.environ.items() if key.lower() in wanted
        }


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
        location = _flat_location(problem["loc"])
        if location is None:
            continue
        message = problem["msg"].removeprefix("Value error, ")
        if location:
            name = env_name(str(location[0]))
            secret = any(word in name.lower() for word in ("password", "token", "secret"))
            shown = "" if secret else _shown_input(problem)
            lines.append(f"{name}: {message}{shown}")
        else:
            lines.append(message)
    return "invalid settings:\n  " + "\n  ".join(lines)


def _flat_location(location: tuple[int | str, ...]) -> tuple[int | str, ...] | None:
    """The error's place from its setting's flat name on (empty: the section's own
    rule, whose message names its settings); None for an error the batching section
    reports already (a request bound the limits take too)."""
    if not location or location[0] not in Settings.model_fields:
        return location
    section, rest = location[0], location[1:]
    if not rest:
        return ()
    if section == "limits" and rest[0] in REQUEST_BOUNDS:
        return None
    holder = Settings.model_fields[str(section)].annotation
    alias = section_fields(holder).get(str(rest[0]), FieldInfo()).validation_alias
    return (alias, *rest[1:]) if isinstance(alias, str) else rest


def _shown_input(problem: Mapping[str, Any]) -> str:
    value = problem.get("input")
    if value is None or isinstance(value, dict):
        return ""
    return f" (got {str(value)[:80]!r})"
