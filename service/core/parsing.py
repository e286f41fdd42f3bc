"""Judging one record: `parse_event(raw, limits)` turns the bytes of one Kafka record
into either a `ParsedEvent` or a `Rejection` with a stable reason code, a message that
names the field and the fix, and the stage (`decode` or `validate`) that the
dead-letter headers carry.

Pure: no Kafka, no HTTP, no clock. The compiled contract (compiled_contract.py)
accepts the common valid event straight from the bytes; whatever it leaves is judged
by `ChangeEvent`'s validators (rules.py), which name the reason.
"""

from __future__ import annotations

import functools
import json
import re
from typing import Any, Final, NamedTuple

from pydantic import ValidationError
from pydantic_core import SchemaValidator

from service.core.compiled_contract import compile_contract
from service.core.contract import ChangeEvent
from service.core.contract_limits import DEFAULT_LIMITS, ContractLimits
from service.core.reasons import Reason, Rejection
from service.core.rules import (
    ACTIVATION_STATUSES,
    BLACKLIST_REASONS,
    KEY_PATTERN,
    MAX_CONSTRAINT_KEYS,
    NOT_A_CONSTRAINT_KEY,
    NOT_AN_SCM_KEY,
    date_warning,
    is_date_key,
    is_iso_date,
    value_bytes,
)

# The JSON parser's own recursion limit; deeper input is refused as too_deeply_nested.
MAX_JSON_NESTING: Final = 200
TOP_LEVEL_FIELDS: Final = (
    "event_id",
    "constraints",
    "scm_data",
    "campaign",
    "reference",
    "expected_codes",
)


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
        if key in NOT_A_CONSTRAINT_KEY:
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
        if key in NOT_A_CONSTRAINT_KEY:
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
    if not NOT_AN_SCM_KEY.isdisjoint(scm_data):
        return None
    for checked, allowed in _CHECKED_SCM_VALUES.items():
        if checked in scm_data and scm_data[checked] not in allowed:
            return None
    return tuple(
        date_warning(key, text)
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
