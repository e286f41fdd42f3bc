"""The bounds of one event, each a setting (docs/settings.md): a module of their own, so
that the contract's rules and its compiled schema (`compiled_contract.py`) both take
them without importing each other.

`ContractLimits` is also the settings' section of these bounds (service/settings.py):
pydantic validates it from the annotations below, so each bound, its range and its
meaning are written here once. Built directly (tests, tools), it is not validated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Final

from pydantic import BeforeValidator, Field

# Constraint value bytes per request: with scm_data and the events' sources, a request
# and its ledger record stay well under Kafka's 1 MiB record limit (1000 values of the
# longest allowed 1024 characters would be 1 MiB of values alone).
DEFAULT_BATCH_MAX_BYTES: Final = 256 * 1024
# Keys that select one code per value unless the event says otherwise.
DEFAULT_ONE_CODE_PER_VALUE_KEYS: Final = frozenset({"rfid"})


def _split_keys(value: Any) -> Any:
    """Accept `rfid,case_id` from the environment as well as a TOML list."""
    if isinstance(value, str):
        return frozenset(part.strip() for part in value.split(",") if part.strip())
    return value


@dataclass(frozen=True, slots=True)
class ContractLimits:
    """Bounds on one event; each is a setting (docs/settings.md) with this default."""

    max_record_bytes: Annotated[
        int,
        Field(ge=1024, le=64 << 20, description="bytes of one record value (`record_too_large`)"),
    ] = 1024 * 1024
    max_values_per_event: Annotated[
        int,
        Field(
            ge=1, le=10_000_000, description="constraint values in one event (`too_many_values`)"
        ),
    ] = 100_000
    max_scm_data_keys: Annotated[
        int,
        Field(ge=1, le=10_000, description="keys in `scm_data` (`scm_data_too_many_keys`)"),
    ] = 100
    max_key_length: Annotated[
        int,
        Field(
            ge=1,
            le=10_000,
            description=(
                "characters of a constraint or scm_data key (`constraint_key_invalid`, "
                "`scm_data_key_invalid`)"
            ),
        ),
    ] = 128
    max_value_length: Annotated[
        int,
        Field(
            ge=1,
            le=1_000_000,
            description=(
                "characters of a value (`constraint_value_too_long`, `scm_data_value_too_long`)"
            ),
        ),
    ] = 1024
    max_reference_length: Annotated[
        int,
        Field(ge=1, le=10_000, description="characters of `reference` (`reference_too_long`)"),
    ] = 255
    max_event_id_length: Annotated[
        int,
        Field(ge=1, le=10_000, description="characters of `event_id` (`event_id_too_long`)"),
    ] = 256
    one_code_per_value_keys: Annotated[
        frozenset[str],
        BeforeValidator(_split_keys),
        Field(
            description=(
                "comma-separated constraint keys whose every value is one code, besides "
                "`extended_id` and `serial_number`; they set the expected code count of events "
                "without `expected_codes`"
            )
        ),
    ] = DEFAULT_ONE_CODE_PER_VALUE_KEYS
    # A request's bounds: an event with several constraint keys is one request of its
    # own, never split, so must fit. They are the settings batch_max_values and
    # batch_max_bytes (the batching section validates and documents them).
    batch_max_values: int = 1000
    batch_max_bytes: int = DEFAULT_BATCH_MAX_BYTES


DEFAULT_LIMITS: Final = ContractLimits()
