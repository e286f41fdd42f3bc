"""The change-event contract: what upstream publishes and how each record is judged.

Pure: no Kafka, no HTTP, no clock. `parse_event(raw, limits)` turns the bytes
of one Kafka record into either a `ParsedEvent` or a `Rejection` with a stable
reason code, a message that names the field and the fix, and the stage
(`decode` or `validate`) that the dead-letter headers carry.

The vendor's rules (docs/scantrust-scm-api.md sections 1 and 2.6) are applied
here so that a bad event is refused before it can spoil a whole batch at the
API. Values are normalised to what the API is sent: strings, with surrounding
white space removed; their case and inner spaces are never touched, because
the API matches constraint values exactly.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date
from enum import StrEnum
from typing import Annotated, Any, Final, NamedTuple

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
)
from pydantic_core import PydanticCustomError, SchemaValidator

from service.core.compiled_contract import compile_contract
from service.core.contract_limits import ContractLimits
from service.core.control_chars import SCHEMA_CLASS, describe, first_control


class Stage(StrEnum):
    """Where a record was refused; carried in `scm_relay.error.stage`."""

    DECODE = "decode"
    VALIDATE = "validate"
    API = "api"


class Reason(StrEnum):
    """Stable machine codes for refused records (`scm_relay.error.reason`).

    Never rename a member's value: operators filter dead letters and alert on them.
    """

    # decode: the bytes are not a JSON object
    NOT_UTF8 = "not_utf8"
    INVALID_JSON = "invalid_json"
    NOT_AN_OBJECT = "not_an_object"
    TOO_DEEPLY_NESTED = "too_deeply_nested"
    # validate: the object breaks a rule
    RECORD_TOO_LARGE = "record_too_large"
    UNKNOWN_FIELD = "unknown_field"
    MISSING_FIELD = "missing_field"
    EVENT_ID_INVALID = "event_id_invalid"
    EVENT_ID_TOO_LONG = "event_id_too_long"
    EVENT_ID_CONTROL_CHARACTER = "event_id_control_character"
    CONSTRAINTS_NOT_OBJECT = "constraints_not_object"
    CONSTRAINTS_KEY_COUNT = "constraints_key_count"
    CONSTRAINT_KEY_MESSAGE = "constraint_key_message"
    CONSTRAINT_KEY_FORBIDDEN = "constraint_key_forbidden"
    CONSTRAINT_KEY_INVALID = "constraint_key_invalid"
    CONSTRAINT_VALUES_EMPTY = "constraint_values_empty"
    CONSTRAINT_VALUE_INVALID = "constraint_value_invalid"
    CONSTRAINT_VALUE_BLANK = "constraint_value_blank"
    CONSTRAINT_VALUE_TOO_LONG = "constraint_value_too_long"
    CONSTRAINT_VALUE_WHITESPACE = "constraint_value_whitespace"
    CONSTRAINT_VALUE_DUPLICATE = "constraint_value_duplicate"
    CONSTRAINT_VALUE_CONTROL_CHARACTER = "constraint_value_control_character"
    TOO_MANY_VALUES = "too_many_values"
    MULTI_KEY_TOO_MANY_VALUES = "multi_key_too_many_values"
    MULTI_KEY_TOO_MANY_BYTES = "multi_key_too_many_bytes"
    SCM_DATA_NOT_OBJECT = "scm_data_not_object"
    SCM_DATA_EMPTY = "scm_data_empty"
    SCM_DATA_TOO_MANY_KEYS = "scm_data_too_many_keys"
    SCM_DATA_KEY_IMMUTABLE = "scm_data_key_immutable"
    SCM_DATA_KEY_PRODUCT_ID = "scm_data_key_product_id"
    SCM_DATA_KEY_STATUS = "scm_data_key_status"
    SCM_DATA_KEY_INVALID = "scm_data_key_invalid"
    SCM_DATA_VALUE_INVALID = "scm_data_value_invalid"
    SCM_DATA_VALUE_TOO_LONG = "scm_data_value_too_long"
    SCM_DATA_VALUE_WHITESPACE = "scm_data_value_whitespace"
    SCM_DATA_VALUE_CONTROL_CHARACTER = "scm_data_value_control_character"
    ACTIVATION_STATUS_INVALID = "activation_status_invalid"
    BLACKLIST_REASON_INVALID = "blacklist_reason_invalid"
    CAMPAIGN_TYPE = "campaign_type"
    CAMPAIGN_NOT_POSITIVE = "campaign_not_positive"
    REFERENCE_INVALID = "reference_invalid"
    REFERENCE_TOO_LONG = "reference_too_long"
    REFERENCE_CONTROL_CHARACTER = "reference_control_character"
    EXPECTED_CODES_INVALID = "expected_codes_invalid"
    DUPLICATE_KEY = "duplicate_key"
    # api: the API refused the batch the event was in
    API_REJECTED = "api_rejected"

    @property
    def stage(self) -> Stage:
        """The stage this reason belongs to."""
        if self in _DECODE_REASONS:
            return Stage.DECODE
        if self is Reason.API_REJECTED:
            return Stage.API
        return Stage.VALIDATE


_DECODE_REASONS: Final = frozenset(
    {Reason.NOT_UTF8, Reason.INVALID_JSON, Reason.NOT_AN_OBJECT, Reason.TOO_DEEPLY_NESTED}
)

# The API's limit of constraint keys in one request, and so in one event.
MAX_CONSTRAINT_KEYS: Final = 5
# Keys that select exactly one code per value: without `expected_codes`, each value
# of such a key is expected to touch one code.
IDENTIFIER_KEYS: Final = frozenset({"extended_id", "serial_number"})
# The JSON parser's own recursion limit; deeper input is refused as too_deeply_nested.
MAX_JSON_NESTING: Final = 200
KEY_PATTERN: Final = r"^[A-Za-z0-9_-]+$"
_KEY_RE: Final = re.compile(KEY_PATTERN)
_ISO_DATE_RE: Final = re.compile(r"^\d{4}-\d{2}-\d{2}$")
ACTIVATION_STATUSES: Final = ("0", "1", "2")
BLACKLIST_REASONS: Final = tuple(str(n) for n in range(11))
TOP_LEVEL_FIELDS: Final = (
    "event_id",
    "constraints",
    "scm_data",
    "campaign",
    "reference",
    "expected_codes",
)


DEFAULT_LIMITS: Final = ContractLimits()


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why a record was refused: what the dead-letter headers and `validate` report."""

    reason: Reason
    message: str
    field: str | None = None
    further_problems: int = 0

    @property
    def stage(self) -> Stage:
        """The stage of `reason`."""
        return self.reason.stage


# ---------------------------------------------------------------------------
# Field validators. Each raises PydanticCustomError whose type is a Reason value
# and whose context carries the human message and the exact field path.


def _problem(reason: Reason, field: str, message: str) -> PydanticCustomError:
    return PydanticCustomError(reason.value, "{message}", {"message": message, "field": field})


def _show(value: Any) -> str:
    """A short, safe rendering of a user value for a message."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _limits(info: ValidationInfo) -> ContractLimits:
    context = info.context
    if isinstance(context, dict):
        limits = context.get("limits")
        if isinstance(limits, ContractLimits):
            return limits
    return DEFAULT_LIMITS


def _warn(info: ValidationInfo, warning: str) -> None:
    context = info.context
    if isinstance(context, dict):
        warnings = context.get("warnings")
        if isinstance(warnings, list):
            warnings.append(warning)


def _check_key(key: str, field: str, limits: ContractLimits, reason: Reason) -> None:
    if not _KEY_RE.fullmatch(key):
        index = first_control(key)
        holds = "" if index is None else f" (it holds {describe(key[index])} at index {index})"
        raise _problem(
            reason,
            field,
            f"key {_show(key)} is not a valid field key{holds}: use only letters, digits, "
            "'_' and '-' (as in the campaign's template.csv)",
        )
    if len(key) > limits.max_key_length:
        raise _problem(
            reason, field, f"key {_show(key)} is longer than {limits.max_key_length} characters"
        )


_FORBIDDEN_CONSTRAINT_KEYS: Final = {
    "product": "select codes by extended_id, serial_number or an SCM field, not by product",
    "product_id": "select codes by extended_id, serial_number or an SCM field, not by product",
    "campaign": "put the campaign id in the top-level 'campaign' field, not in constraints",
    "campaign_id": "put the campaign id in the top-level 'campaign' field, not in constraints",
}


def _constraint_key(key: str, limits: ContractLimits) -> None:
    field = f"constraints.{key}"
    if key == "message":
        raise _problem(
            Reason.CONSTRAINT_KEY_MESSAGE,
            field,
            "Invalid constraint name, please use 'extended_id' instead of 'message'",
        )
    if key in _FORBIDDEN_CONSTRAINT_KEYS:
        raise _problem(
            Reason.CONSTRAINT_KEY_FORBIDDEN,
            field,
            f"'{key}' is not allowed as a constraint: {_FORBIDDEN_CONSTRAINT_KEYS[key]}",
        )
    _check_key(key, "constraints", limits, Reason.CONSTRAINT_KEY_INVALID)


_INVISIBLE: Final = (
    "control and format characters (line breaks, tabs, escape sequences, zero-width "
    "spaces, direction marks) are invisible and would be sent as they are"
)


def _no_control(text: str, reason: Reason, field: str, what: str) -> None:
    index = first_control(text)
    if index is not None:
        raise _problem(
            reason,
            field,
            f"{what} {_show(text)} holds {describe(text[index])} at index {index}: "
            f"publish it without that character; {_INVISIBLE}",
        )


def _constraint_value(value: Any, field: str, limits: ContractLimits) -> str:
    # bool is an int in Python, but `true` is no code; floats lose digits.
    if isinstance(value, str):
        text = value
        if text.strip() and text != text.strip():
            # Scantrust matches codes exactly: " 0A70X1" selects no code, and stripping
            # it would send what nobody published.
            raise _problem(
                Reason.CONSTRAINT_VALUE_WHITESPACE,
                field,
                f"constraint value {_show(value)} has white space around it; the API matches "
                "codes exactly: publish the value without it",
            )
        text = text.strip()
    elif isinstance(value, int) and not isinstance(value, bool):
        text = str(value)
    else:
        raise _problem(
            Reason.CONSTRAINT_VALUE_INVALID,
            field,
            f"constraint value {_show(value)} must be a string (or a whole number); "
            "write codes as strings",
        )
    if not text:
        raise _problem(
            Reason.CONSTRAINT_VALUE_BLANK,
            field,
            "constraint value is blank: remove it or fill it in",
        )
    _no_control(text, Reason.CONSTRAINT_VALUE_CONTROL_CHARACTER, field, "constraint value")
    if len(text) > limits.max_value_length:
        raise _problem(
            Reason.CONSTRAINT_VALUE_TOO_LONG,
            field,
            f"constraint value is {len(text)} characters long; "
            f"the limit is {limits.max_value_length}",
        )
    return text


def _constraints(value: Any, info: ValidationInfo) -> dict[str, tuple[str, ...]]:
    limits = _limits(info)
    if not isinstance(value, dict):
        raise _problem(
            Reason.CONSTRAINTS_NOT_OBJECT,
            "constraints",
            'constraints must be an object of one to five keys, e.g. {"extended_id": ["0A70X1"]}',
        )
    if not 1 <= len(value) <= MAX_CONSTRAINT_KEYS:
        found = ", ".join(_show(k) for k in value) or "none"
        fix = (
            'select the codes, e.g. {"extended_id": ["0A70X1"]}'
            if not value
            else f"the API takes at most {MAX_CONSTRAINT_KEYS} constraints in a request: "
            "publish several events"
        )
        raise _problem(
            Reason.CONSTRAINTS_KEY_COUNT,
            "constraints",
            f"constraints must have 1 to {MAX_CONSTRAINT_KEYS} keys, found {len(value)} "
            f"({found}); {fix}",
        )
    constraints = {key: _constraint_values(key, raw, limits) for key, raw in value.items()}
    if len(constraints) > 1:
        _one_request(constraints, limits)
    return constraints


def _constraint_values(key: str, raw_values: Any, limits: ContractLimits) -> tuple[str, ...]:
    _constraint_key(key, limits)
    field = f"constraints.{key}"
    if not isinstance(raw_values, list):
        return (_constraint_value(raw_values, field, limits),)
    if not raw_values:
        raise _problem(
            Reason.CONSTRAINT_VALUES_EMPTY,
            field,
            "the list of constraint values is empty: list at least one code",
        )
    if len(raw_values) > limits.max_values_per_event:
        raise _problem(
            Reason.TOO_MANY_VALUES,
            field,
            f"{len(raw_values)} values exceed the limit of {limits.max_values_per_event} "
            "per event: split the event",
        )
    first_index: dict[str, int] = {}
    for index, raw in enumerate(raw_values):
        text = _constraint_value(raw, f"{field}[{index}]", limits)
        earlier = first_index.setdefault(text, index)
        if earlier != index:
            raise _problem(
                Reason.CONSTRAINT_VALUE_DUPLICATE,
                f"{field}[{index}]",
                f"value {_show(text)} at index {index} duplicates index {earlier}: "
                "list each value once",
            )
    return tuple(first_index)


def _one_request(constraints: dict[str, tuple[str, ...]], limits: ContractLimits) -> None:
    """An event with several keys is sent as a request of its own, never split (whether
    the API combines keys with AND or OR is not documented): it must fit one request."""
    values = sum(len(values) for values in constraints.values())
    if values > limits.max_values_per_event:
        raise _problem(
            Reason.TOO_MANY_VALUES,
            "constraints",
            f"{values} values exceed the limit of {limits.max_values_per_event} per event: "
            "split the event",
        )
    keys = len(constraints)
    if values > limits.batch_max_values:
        raise _problem(
            Reason.MULTI_KEY_TOO_MANY_VALUES,
            "constraints",
            f"an event with {keys} constraint keys is sent as one request, never split, and "
            f"its {values} values exceed the {limits.batch_max_values} a request carries: "
            "publish fewer values, or one event per key (those are merged and split freely)",
        )
    size = value_bytes(value for values in constraints.values() for value in values)
    if size > limits.batch_max_bytes:
        raise _problem(
            Reason.MULTI_KEY_TOO_MANY_BYTES,
            "constraints",
            f"an event with {keys} constraint keys is sent as one request, never split, and "
            f"its values are {size} bytes (UTF-8), over the {limits.batch_max_bytes} a "
            "request carries: publish fewer values, or one event per key (those are merged "
            "and split freely)",
        )


def value_bytes(values: Iterable[str]) -> int:
    """The UTF-8 bytes of `values` together (one join: most codes are ASCII)."""
    joined = "".join(values)
    return len(joined) if joined.isascii() else len(joined.encode())


_IMMUTABLE_SCM_KEYS: Final = frozenset({"extended_id", "serial_number", "message"})


def _scm_key(key: str, limits: ContractLimits) -> None:
    field = f"scm_data.{key}"
    if key in _IMMUTABLE_SCM_KEYS:
        raise _problem(
            Reason.SCM_DATA_KEY_IMMUTABLE,
            field,
            f"Invalid key name: '{key}' can not be changed; use it in constraints "
            "to select codes instead",
        )
    if key == "product_id":
        raise _problem(
            Reason.SCM_DATA_KEY_PRODUCT_ID,
            field,
            "Invalid key name, use 'product' instead of 'product_id'",
        )
    if key == "status":
        raise _problem(
            Reason.SCM_DATA_KEY_STATUS,
            field,
            "Invalid key name, use 'activation_status' instead of 'status'",
        )
    _check_key(key, "scm_data", limits, Reason.SCM_DATA_KEY_INVALID)


def _scm_value(key: str, value: Any, limits: ContractLimits) -> str:
    field = f"scm_data.{key}"
    if isinstance(value, str):
        text = value
        if text != text.strip():
            raise _problem(
                Reason.SCM_DATA_VALUE_WHITESPACE,
                field,
                f"value {_show(value)} has white space around it; it would be saved as it "
                "is: publish the value without it",
            )
        _no_control(text, Reason.SCM_DATA_VALUE_CONTROL_CHARACTER, field, "value")
    elif isinstance(value, int) and not isinstance(value, bool):
        text = str(value)
    elif isinstance(value, float) and math.isfinite(value):
        text = repr(value)
    else:
        raise _problem(
            Reason.SCM_DATA_VALUE_INVALID,
            field,
            f"value {_show(value)} must be a string or a number",
        )
    if len(text) > limits.max_value_length:
        raise _problem(
            Reason.SCM_DATA_VALUE_TOO_LONG,
            field,
            f"value is {len(text)} characters long; the limit is {limits.max_value_length}",
        )
    if key == "activation_status" and text not in ACTIVATION_STATUSES:
        raise _problem(
            Reason.ACTIVATION_STATUS_INVALID,
            field,
            f"activation_status {_show(value)} must be 0 (inactive), 1 (active) or 2 (blacklisted)",
        )
    if key == "blacklist_reason" and text not in BLACKLIST_REASONS:
        raise _problem(
            Reason.BLACKLIST_REASON_INVALID,
            field,
            f"blacklist_reason {_show(value)} must be a whole number from 0 to 10",
        )
    return text


def is_date_key(key: str) -> bool:
    """Keys the API treats as Date fields by convention: `date` or `*_date`."""
    return key == "date" or key.endswith("_date")


def is_iso_date(text: str) -> bool:
    """True for a real calendar date written `YYYY-MM-DD`."""
    if not _ISO_DATE_RE.match(text):
        return False
    try:
        date.fromisoformat(text)
    except ValueError:
        return False
    return True


def _date_warning(key: str, text: str) -> str:
    return (
        f"scm_data.{key}: {_show(text)} is not a YYYY-MM-DD date; "
        "the API saves it as-is and the portal may show it badly"
    )


def _scm_data(value: Any, info: ValidationInfo) -> dict[str, str]:
    limits = _limits(info)
    if not isinstance(value, dict):
        raise _problem(
            Reason.SCM_DATA_NOT_OBJECT,
            "scm_data",
            'scm_data must be an object of field keys and values, e.g. {"intended_market": "DE"}',
        )
    if not value:
        raise _problem(
            Reason.SCM_DATA_EMPTY, "scm_data", "scm_data is empty: give at least one field to set"
        )
    if len(value) > limits.max_scm_data_keys:
        raise _problem(
            Reason.SCM_DATA_TOO_MANY_KEYS,
            "scm_data",
            f"scm_data has {len(value)} keys; the limit is {limits.max_scm_data_keys}",
        )
    normalised: dict[str, str] = {}
    for key in sorted(value):  # problems and warnings reported in key order
        _scm_key(key, limits)
        text = _scm_value(key, value[key], limits)
        if is_date_key(key) and not is_iso_date(text):
            _warn(info, _date_warning(key, text))
        normalised[key] = text
    # In the publisher's key order, as the compiled contract builds it: batches and
    # requests order scm_data themselves (service/core/batching.py).
    return {key: normalised[key] for key in value}


def _bounded_text(
    value: Any,
    *,
    field: str,
    limit: int,
    invalid: Reason,
    too_long: Reason,
    control: Reason,
    allow_blank: bool,
) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or (not allow_blank and not value.strip()):
        raise _problem(invalid, field, f"{field} must be a non-blank string or be left out")
    _no_control(value, control, field, field)
    if len(value) > limit:
        raise _problem(
            too_long, field, f"{field} is {len(value)} characters long; the limit is {limit}"
        )
    return value


def _event_id(value: Any, info: ValidationInfo) -> str | None:
    return _bounded_text(
        value,
        field="event_id",
        limit=_limits(info).max_event_id_length,
        invalid=Reason.EVENT_ID_INVALID,
        too_long=Reason.EVENT_ID_TOO_LONG,
        control=Reason.EVENT_ID_CONTROL_CHARACTER,
        allow_blank=False,
    )


def _reference(value: Any, info: ValidationInfo) -> str | None:
    return _bounded_text(
        value,
        field="reference",
        limit=_limits(info).max_reference_length,
        invalid=Reason.REFERENCE_INVALID,
        too_long=Reason.REFERENCE_TOO_LONG,
        control=Reason.REFERENCE_CONTROL_CHARACTER,
        allow_blank=True,
    )


def _campaign(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, str):
        # The API's own wording for a campaign given as a string.
        raise _problem(
            Reason.CAMPAIGN_TYPE,
            "campaign",
            "Incorrect type. Expected pk value, received str. "
            "Give the campaign id as a number, e.g. 11",
        )
    if not isinstance(value, int) or isinstance(value, bool):
        raise _problem(
            Reason.CAMPAIGN_TYPE,
            "campaign",
            f"Incorrect type. Expected pk value, received {type(value).__name__}. "
            "Give the campaign id as a whole number, e.g. 11",
        )
    if value < 1:
        raise _problem(
            Reason.CAMPAIGN_NOT_POSITIVE,
            "campaign",
            f"campaign {value} is not a campaign id: ids are positive whole numbers",
        )
    return value


def _expected_codes(value: Any) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise _problem(
            Reason.EXPECTED_CODES_INVALID,
            "expected_codes",
            f"expected_codes {_show(value)} must be a whole number of codes, 0 or more",
        )
    return value


# JSON Schemas of the accepted input (the field validators above are plain
# functions, so pydantic cannot derive them). They use the default limits.
# Values are sent as published, so white space around one is refused: a constraint
# value has something else in it; an scm_data value may be empty.
NO_SURROUNDING_SPACE: Final = r"^\S(?:[\s\S]*\S)?$"
NO_SPACE_AROUND: Final = r"^(?:\S(?:[\s\S]*\S)?)?$"
# No string holds a control or format character (service/core/control_chars.py). Said as
# "does not contain one" rather than an anchored "[^...]*$": in Python's `re` (the
# `jsonschema` library) `$` also matches before a final line break, so the anchored form
# would pass "a\n". The `type` keeps the rule off the null of optional fields.
# (devkit/schemas.py writes it once, under $defs, and refers to it.)
CONTROL_CHARACTER_SCHEMA: Final = {"type": "string", "pattern": SCHEMA_CLASS}
_NO_CONTROL: Final = {"not": CONTROL_CHARACTER_SCHEMA}
_KEY_SCHEMA: Final = {
    "type": "string",
    "pattern": KEY_PATTERN,
    "maxLength": DEFAULT_LIMITS.max_key_length,
    **_NO_CONTROL,
}
_CONSTRAINT_VALUE_SCHEMA: Final = {
    "oneOf": [
        {
            "type": "string",
            "pattern": NO_SURROUNDING_SPACE,
            "maxLength": DEFAULT_LIMITS.max_value_length,
            **_NO_CONTROL,
        },
        {"type": "integer"},
    ]
}
_CONSTRAINTS_SCHEMA: Final = {
    "type": "object",
    "description": (
        "Selects the codes to change: one to five keys (extended_id, serial_number or an "
        "SCM field key such as rfid), each with one value or a list of distinct values. "
        "Values are matched exactly (case sensitive) and hold no control or format "
        "character (Unicode Cc, Cf). An event with several keys is sent as a request of "
        "its own, so its values must fit one request (1000 values by default)."
    ),
    "minProperties": 1,
    "maxProperties": MAX_CONSTRAINT_KEYS,
    "propertyNames": {
        "allOf": [
            _KEY_SCHEMA,
            {"not": {"enum": ["message", "product", "product_id", "campaign", "campaign_id"]}},
        ]
    },
    "additionalProperties": {
        "oneOf": [
            _CONSTRAINT_VALUE_SCHEMA,
            {
                "type": "array",
                "items": _CONSTRAINT_VALUE_SCHEMA,
                "minItems": 1,
                "maxItems": DEFAULT_LIMITS.max_values_per_event,
                "uniqueItems": True,
            },
        ]
    },
    "examples": [
        {"extended_id": ["0A70X1", "0A70X2"]},
        {"rfid": "E2801160600002"},
        {"serial_number": ["SN-1", "SN-2"], "lot_case_id": "C-7"},
    ],
}
_SCM_VALUE_SCHEMA: Final = {
    "oneOf": [
        {
            "type": "string",
            "pattern": NO_SPACE_AROUND,
            "maxLength": DEFAULT_LIMITS.max_value_length,
            **_NO_CONTROL,
        },
        {"type": "number"},
    ],
}
_SCM_DATA_SCHEMA: Final = {
    "type": "object",
    "description": (
        "The SCM fields to write on every selected code. Values are sent as strings. "
        "Keys named 'date' or ending in '_date' should hold YYYY-MM-DD dates."
    ),
    "minProperties": 1,
    "maxProperties": DEFAULT_LIMITS.max_scm_data_keys,
    "propertyNames": {
        "allOf": [
            _KEY_SCHEMA,
            {"not": {"enum": sorted([*_IMMUTABLE_SCM_KEYS, "product_id", "status"])}},
        ]
    },
    "properties": {
        "activation_status": {
            "description": "0 inactive, 1 active, 2 blacklisted",
            "oneOf": [
                {"type": "integer", "enum": [0, 1, 2]},
                {"type": "string", "pattern": r"^[0-2]$", **_NO_CONTROL},
            ],
        },
        "blacklist_reason": {
            "description": "0 to 10, see docs/event-contract.md",
            "oneOf": [
                {"type": "integer", "minimum": 0, "maximum": 10},
                {"type": "string", "pattern": r"^([0-9]|10)$", **_NO_CONTROL},
            ],
        },
    },
    "additionalProperties": _SCM_VALUE_SCHEMA,
    "examples": [{"production_date": "2026-11-27", "intended_market": "DE"}],
}


def _constraints_as_lists(value: dict[str, tuple[str, ...]]) -> dict[str, list[str]]:
    return {key: list(values) for key, values in value.items()}


Constraints = Annotated[
    dict[str, tuple[str, ...]],
    PlainValidator(_constraints),
    PlainSerializer(_constraints_as_lists),
    WithJsonSchema(_CONSTRAINTS_SCHEMA),
]
ScmData = Annotated[dict[str, str], PlainValidator(_scm_data), WithJsonSchema(_SCM_DATA_SCHEMA)]
EventId = Annotated[
    str | None,
    PlainValidator(_event_id),
    WithJsonSchema(
        {
            "type": ["string", "null"],
            "pattern": r"\S",
            "maxLength": DEFAULT_LIMITS.max_event_id_length,
            **_NO_CONTROL,
            "description": "The publisher's id of this event; carried into results and logs.",
        }
    ),
]
Campaign = Annotated[
    int | None,
    PlainValidator(_campaign),
    WithJsonSchema(
        {"type": ["integer", "null"], "minimum": 1, "description": "Scantrust campaign id."}
    ),
]
Reference = Annotated[
    str | None,
    PlainValidator(_reference),
    WithJsonSchema(
        {
            "type": ["string", "null"],
            "maxLength": DEFAULT_LIMITS.max_reference_length,
            **_NO_CONTROL,
            "description": "Human-readable name; tasks can be grouped by it at the API.",
        }
    ),
]
ExpectedCodes = Annotated[
    int | None,
    PlainValidator(_expected_codes),
    WithJsonSchema(
        {
            "type": ["integer", "null"],
            "minimum": 0,
            "description": "How many codes this event should touch.",
        }
    ),
]


class ChangeEvent(BaseModel):
    """One SCM change published by an upstream system (docs/design.md section 2.1)."""

    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        title="SCM change event",
        json_schema_extra={
            "$comment": "Generated from service.core.contract.ChangeEvent; do not edit.",
        },
    )

    event_id: EventId = Field(default=None)
    constraints: Constraints
    scm_data: ScmData
    campaign: Campaign = Field(default=None)
    reference: Reference = Field(default=None)
    expected_codes: ExpectedCodes = Field(default=None)

    # `constraints`: each key (`extended_id`, `serial_number` or an SCM field) with its
    # values, normalised, in the order given, without duplicates. One key for most events;
    # an event with several is sent as a request of its own (docs/design.md section 4).

    @property
    def value_count(self) -> int:
        """The constraint values of all keys."""
        return sum(len(values) for values in self.constraints.values())


class ParsedEvent(NamedTuple):
    """An accepted event and the warnings it raised (e.g. a non-ISO date).

    (A named tuple: one is built per event, in half a frozen dataclass's time.)"""

    event: ChangeEvent
    warnings: tuple[str, ...] = ()


def parse_event(raw: bytes, limits: ContractLimits = DEFAULT_LIMITS) -> ParsedEvent | Rejection:
    """Judge the value bytes of one record: an accepted event, or why not.

    Never raises for any input: every failure is a classified `Rejection`. The
    compiled contract accepts the common valid event; whatever it leaves is judged
    by `ChangeEvent`'s validators, which name the reason.
    """
    if len(raw) > limits.max_record_bytes:
        return Rejection(
            Reason.RECORD_TOO_LARGE,
            f"the record is {len(raw)} bytes; the limit is {limits.max_record_bytes}",
        )
    return _accept_compiled(raw, limits) or _judge(raw, limits)


def _judge(raw: bytes, limits: ContractLimits) -> ParsedEvent | Rejection:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return Rejection(
            Reason.NOT_UTF8,
            f"the record is not UTF-8 text (byte {exc.start}): publish JSON encoded as UTF-8",
        )
    warnings: list[str] = []
    try:
        event = ChangeEvent.model_validate_json(
            text, context={"limits": limits, "warnings": warnings}
        )
    except ValidationError as exc:
        return rejection_from(exc)
    keys = len(event.model_fields_set) + len(event.constraints) + len(event.scm_data)
    if _may_repeat_a_key(raw, keys):
        duplicate = _duplicate_key(text)
        if duplicate is not None:
            return duplicate
    return ParsedEvent(event, tuple(warnings))


@functools.lru_cache(maxsize=8)  # a relay has one set of limits; tests a few
def _compile(limits: ContractLimits) -> SchemaValidator:
    return compile_contract(ChangeEvent, limits, KEY_PATTERN, MAX_CONSTRAINT_KEYS)


# The limits of the last call and their validator: a relay passes the same limits
# object every time, and hashing the limits to find theirs costs as much as a check.
_last_compiled: list[tuple[ContractLimits, SchemaValidator]] = []


def _compiled(limits: ContractLimits) -> SchemaValidator:
    if _last_compiled and _last_compiled[0][0] is limits:
        return _last_compiled[0][1]
    validator = _compile(limits)
    _last_compiled[:] = [(limits, validator)]
    return validator


_NOT_A_CONSTRAINT_KEY: Final = frozenset({"message", *_FORBIDDEN_CONSTRAINT_KEYS})
_NOT_AN_SCM_KEY: Final = frozenset({*_IMMUTABLE_SCM_KEYS, "product_id", "status"})
_CHECKED_SCM_VALUES: Final = {
    "activation_status": frozenset(ACTIVATION_STATUSES),
    "blacklist_reason": frozenset(BLACKLIST_REASONS),
}
# scm_data repeats from event to event (it is what batches are made of), so what the
# compiled contract leaves to check in it is remembered per distinct scm_data. Bound:
# when full the memory is dropped and refilled (a few hundred bytes an entry).
SCM_DATA_VERDICTS_MAX: Final = 4096
_ScmVerdict = tuple[str, ...] | None  # the warnings it raises, or None: judge it
_scm_data_verdicts: dict[tuple[tuple[str, str], ...], _ScmVerdict] = {}


def _accept_compiled(raw: bytes, limits: ContractLimits) -> ParsedEvent | None:
    """The event, when the compiled contract and the checks it cannot express accept
    it with the same result `ChangeEvent`'s validators give; else None (judge it)."""
    try:
        event = _compiled(limits).validate_json(raw)
    except ValidationError:
        return None
    constraints = event.constraints
    if len(constraints) == 1:
        ((key, values),) = constraints.items()
        if key in _NOT_A_CONSTRAINT_KEY:
            return None
        if type(values) is str:
            constraints[key] = (values,)
        elif len(values) > 1 and len(set(values)) != len(values):
            return None
    elif not _fits_one_request(constraints, limits):
        return None
    scm_data = event.scm_data
    keys = len(event.__pydantic_fields_set__) + len(constraints) + len(scm_data)
    if _may_repeat_a_key(raw, keys):
        return None
    items = tuple(scm_data.items())
    try:
        verdict = _scm_data_verdicts[items]
    except KeyError:
        verdict = _scm_data_verdict(scm_data)
        if len(_scm_data_verdicts) >= SCM_DATA_VERDICTS_MAX:
            _scm_data_verdicts.clear()
        _scm_data_verdicts[items] = verdict
    if verdict is None:
        return None
    return ParsedEvent(event, verdict)


def _fits_one_request(constraints: dict[str, Any], limits: ContractLimits) -> bool:
    """Whether the compiled contract's constraints of several keys (each a string or a
    tuple of strings) are what the validators accept: allowed keys, no value twice under
    a key, all of them within one request's bounds. Lone strings become 1-tuples."""
    for key, values in constraints.items():
        if key in _NOT_A_CONSTRAINT_KEY:
            return False
        if type(values) is str:
            constraints[key] = (values,)
        elif len(set(values)) != len(values):
            return False
    count = sum(len(values) for values in constraints.values())
    return (
        count <= limits.max_values_per_event
        and count <= limits.batch_max_values
        and value_bytes(value for values in constraints.values() for value in values)
        <= limits.batch_max_bytes
    )


def _scm_data_verdict(scm_data: dict[str, str]) -> _ScmVerdict:
    """What the compiled contract cannot check in one scm_data (all strings with valid
    keys): forbidden keys and checked values (None: let the validators say why), and
    the warnings it raises."""
    if not _NOT_AN_SCM_KEY.isdisjoint(scm_data):
        return None
    for checked, allowed in _CHECKED_SCM_VALUES.items():
        if checked in scm_data and scm_data[checked] not in allowed:
            return None
    return tuple(
        _date_warning(key, text)
        for key, text in sorted(scm_data.items())
        if is_date_key(key) and not is_iso_date(text)
    )


def _may_repeat_a_key(raw: bytes, keys: int) -> bool:
    """False when the document cannot name a key twice: every key it holds is followed
    by a colon, so no more colons than the event's `keys` (top-level fields given, plus
    the keys of constraints and scm_data) means none came twice. True asks for the
    slower look (a colon inside a string, or a real repeat)."""
    return raw.count(b":") > keys and len(_KEY_END.findall(raw)) > keys


_KEY_END: Final = re.compile(rb'"\s*:')


class _DuplicateKeyError(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise _DuplicateKeyError(key)
        seen[key] = value
    return seen


def _duplicate_key(text: str) -> Rejection | None:
    """A JSON object naming one key twice: a parser keeps one of the two silently, so
    the event is refused (it is already known to be valid JSON of bounded depth)."""
    if text.count('"') < 2:
        return None
    try:
        json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except _DuplicateKeyError as exc:
        return Rejection(
            Reason.DUPLICATE_KEY,
            f"the key {exc.key!r} appears twice in one object; a reader would keep one of "
            "them silently: publish each key once",
            exc.key,
        )
    except (ValueError, RecursionError):
        return None  # the validating parse accepted it; nothing more to say here
    return None


def rejection_from(error: ValidationError) -> Rejection:
    """Classify pydantic's errors for one event into the first `Rejection`."""
    problems = error.errors(include_url=False, include_input=False)
    first = problems[0]
    further = len(problems) - 1
    kind = first["type"]
    location = ".".join(str(part) for part in first["loc"])
    context = first.get("ctx") or {}
    try:
        reason = Reason(kind)
    except ValueError:
        return _builtin_rejection(kind, location, first["msg"], context, further)
    return Rejection(reason, str(context["message"]), str(context["field"]), further)


_MISSING_HINTS: Final = {
    "constraints": ': select the codes, e.g. "constraints": {"extended_id": ["0A70X1"]}',
    "scm_data": ': give the fields to set, e.g. "scm_data": {"intended_market": "DE"}',
}


def _builtin_rejection(
    kind: str, location: str, text: str, context: dict[str, Any], further: int
) -> Rejection:
    if kind == "json_invalid":
        detail = str(context.get("error", text))
        if "recursion limit" in detail:
            return Rejection(
                Reason.TOO_DEEPLY_NESTED,
                f"the JSON is nested more than {MAX_JSON_NESTING} levels deep ({detail})",
            )
        return Rejection(Reason.INVALID_JSON, f"the record is not valid JSON: {detail}")
    if kind in ("model_type", "model_attributes_type") and not location:
        return Rejection(
            Reason.NOT_AN_OBJECT,
            "the record must be a JSON object with constraints and scm_data",
        )
    if kind == "extra_forbidden":
        return Rejection(
            Reason.UNKNOWN_FIELD,
            f"unknown field {location!r}: an event has only {', '.join(TOP_LEVEL_FIELDS)}",
            location,
            further,
        )
    if kind == "missing":
        hint = _MISSING_HINTS.get(location, "")
        return Rejection(Reason.MISSING_FIELD, f"{location!r} is required{hint}", location, further)
    # Every field has its own validator, so this is unreachable for ChangeEvent;
    # classify rather than crash if a model change makes it reachable.
    return Rejection(Reason.INVALID_JSON, f"{location or 'record'}: {text}", location or None)
