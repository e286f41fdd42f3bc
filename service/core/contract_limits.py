"""The bounds of one event, each a setting (docs/settings.md): a module of their own, so
that the contract's rules and its compiled schema (`compiled_contract.py`) both take
them without importing each other."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

# Constraint value bytes per request: with scm_data and the events' sources, a request
# and its ledger record stay well under Kafka's 1 MiB record limit (1000 values of the
# longest allowed 1024 characters would be 1 MiB of values alone).
DEFAULT_BATCH_MAX_BYTES: Final = 256 * 1024
# Keys that select one code per value unless the event says otherwise.
DEFAULT_ONE_CODE_PER_VALUE_KEYS: Final = frozenset({"rfid"})


@dataclass(frozen=True, slots=True)
class ContractLimits:
    """Bounds on one event; each is a setting (docs/settings.md) with this default."""

    max_record_bytes: int = 1024 * 1024
    max_values_per_event: int = 100_000
    max_scm_data_keys: int = 100
    max_key_length: int = 128
    max_value_length: int = 1024
    max_reference_length: int = 255
    max_event_id_length: int = 256
    one_code_per_value_keys: frozenset[str] = DEFAULT_ONE_CODE_PER_VALUE_KEYS
    # A request's bounds (the settings batch_max_values and batch_max_bytes): an event
    # with several constraint keys is one request of its own, never split, so must fit.
    batch_max_values: int = 1000
    batch_max_bytes: int = DEFAULT_BATCH_MAX_BYTES
