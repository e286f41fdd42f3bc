"""The vendor's rules for one change event, field by field (docs/scantrust-scm-api.md
sections 1 and 2.6), applied so that a bad event is refused before it can spoil a whole
batch at the API.

Each check raises a `PydanticCustomError` whose type is a `Reason` value and whose
context carries the message (it names the field and the fix) and the exact field
path; `ChangeEvent` (contract.py) runs them as its fields' validators. Values are
normalised to what the API is sent: strings, with surrounding white space removed;
their case and inner spaces are never touched, because the API matches constraint
values exactly.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from datetime import date
from typing import Any, Final

from pydantic import ValidationInfo
from pydantic_core import PydanticCustomError

from service.core.contract_limits import DEFAULT_LIMITS, ContractLimits
from service.core.control_chars import describe, first_control
from service.core.reasons import Reason

# The API's limit of constraint keys in one request, and so in one event.
MAX_CONSTRAINT_KEYS: Final = 5
# Keys that select exactly one code per value: without `expected_codes`, each value
# of such a key is expected to touch one code.
IDENTIFIER_KEYS: Final = frozenset({"extended_id", "serial_number"})
KEY_PATTERN: Final = r"^[A-Za-z0-9_-]+$"
_KEY_RE: Final = re.compile(KEY_PATTERN)
_ISO_DATE_RE: Final = re.compile(r"^\d{4}-\d{2}-\d{2}$")
ACTIVATION_STATUSES: Final = ("0", "1", "2")
BLACKLIST_REASONS: Final = tuple(str(n) for n in range(11))


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


def check_constraints(value: Any, info: ValidationInfo) -> dict[str, tuple[str, ...]]:
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
# Keys refused whatever their value: what the compiled contract cannot say (parsing.py)
# and, for scm_data, what the JSON Schema lists (contract.py).
NOT_A_CONSTRAINT_KEY: Final = frozenset({"message", *_FORBIDDEN_CONSTRAINT_KEYS})
NOT_AN_SCM_KEY: Final = frozenset({*_IMMUTABLE_SCM_KEYS, "product_id", "status"})


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


def date_warning(key: str, text: str) -> str:
    return (
        f"scm_data.{key}: {_show(text)} is not a YYYY-MM-DD date; "
        "the API saves it as-is and the portal may show it badly"
    )


def check_scm_data(value: Any, info: ValidationInfo) -> dict[str, str]:
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
            _warn(info, date_warning(key, text))
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


def check_event_id(value: Any, info: ValidationInfo) -> str | None:
    return _bounded_text(
        value,
        field="event_id",
        limit=_limits(info).max_event_id_length,
        invalid=Reason.EVENT_ID_INVALID,
        too_long=Reason.EVENT_ID_TOO_LONG,
        control=Reason.EVENT_ID_CONTROL_CHARACTER,
        allow_blank=False,
    )


def check_reference(value: Any, info: ValidationInfo) -> str | None:
    return _bounded_text(
        value,
        field="reference",
        limit=_limits(info).max_reference_length,
        invalid=Reason.REFERENCE_INVALID,
        too_long=Reason.REFERENCE_TOO_LONG,
        control=Reason.REFERENCE_CONTROL_CHARACTER,
        allow_blank=True,
    )


def check_campaign(value: Any) -> int | None:
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


def check_expected_codes(value: Any) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise _problem(
            Reason.EXPECTED_CODES_INVALID,
            "expected_codes",
            f"expected_codes {_show(value)} must be a whole number of codes, 0 or more",
        )
    return value
