"""The compiled contract (service/core/compiled_contract.py) is only a shortcut: what it
accepts, the contract's validators accept with the same result, and it really is the
compiled schema (not ChangeEvent's own validators brought back by pydantic-core)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from service.core import parsing
from service.core.contract_limits import DEFAULT_LIMITS, ContractLimits
from service.core.parsing import ParsedEvent, parse_event
from service.core.reasons import Reason, Rejection


def shortcut(raw: bytes, limits: ContractLimits = DEFAULT_LIMITS) -> ParsedEvent | None:
    return parsing._accept_compiled(raw, limits)


def judged(raw: bytes, limits: ContractLimits = DEFAULT_LIMITS) -> ParsedEvent | Rejection:
    return parsing._judge(raw, limits)


def assert_same_verdict(raw: bytes, limits: ContractLimits = DEFAULT_LIMITS) -> None:
    """The shortcut either leaves the record to the validators or gives their result."""
    fast = shortcut(raw, limits)
    slow = judged(raw, limits)
    if fast is None:
        return
    assert isinstance(slow, ParsedEvent), (raw, slow)
    assert fast.event == slow.event
    assert fast.event.model_fields_set == slow.event.model_fields_set
    assert list(fast.event.scm_data) == list(slow.event.scm_data)  # ordered alike
    assert fast.event.constraints == slow.event.constraints
    assert fast.warnings == slow.warnings


def encode(document: Any) -> bytes:
    return json.dumps(document, ensure_ascii=False).encode()


VALID = {"constraints": {"extended_id": ["0A70X1", "0A70X2"]}, "scm_data": {"lot": "L1"}}


def test_a_plain_valid_event_takes_the_shortcut_with_the_validators_result() -> None:
    raw = encode({**VALID, "event_id": "e-1", "campaign": 11, "reference": "", "expected_codes": 2})
    assert shortcut(raw) is not None
    assert_same_verdict(raw)
    result = parse_event(raw)
    assert isinstance(result, ParsedEvent)
    assert result.event.constraints == {"extended_id": ("0A70X1", "0A70X2")}


def test_the_shortcut_is_the_compiled_schema_not_the_models_own_validators() -> None:
    # ChangeEvent's validators accept a whole-number code; the compiled schema leaves it
    # to them. If pydantic-core reused the model's own validator, this would pass it.
    raw = encode({"constraints": {"extended_id": [7]}, "scm_data": {"lot": "L1"}})
    with pytest.raises(ValidationError):
        parsing._compiled(DEFAULT_LIMITS).validate_json(raw)
    result = parse_event(raw)
    assert isinstance(result, ParsedEvent)
    assert result.event.constraints == {"extended_id": ("7",)}


CORNER_CASES: list[tuple[str, bytes]] = [
    ("byte order mark", b"\xef\xbb\xbf" + encode(VALID)),
    ("invalid utf-8 in a value", b'{"constraints":{"extended_id":["\xff"]},"scm_data":{"a":"b"}}'),
    ("float campaign", encode({**VALID, "campaign": 11.0})),
    ("bool campaign", encode({**VALID, "campaign": True})),
    ("bool expected_codes", encode({**VALID, "expected_codes": False})),
    ("campaign 0", encode({**VALID, "campaign": 0})),
    ("key with a trailing newline", encode({**VALID, "constraints": {"extended_id\n": ["a"]}})),
    ("scm key with a trailing newline", encode({**VALID, "scm_data": {"lot\n": "L1"}})),
    ("value ending in a separator", encode({**VALID, "constraints": {"extended_id": ["a\x1c"]}})),
    ("value ending in a no-break space", encode({**VALID, "scm_data": {"lot": "L1\xa0"}})),
    ("blank value", encode({**VALID, "constraints": {"extended_id": ["  "]}})),
    ("empty scm value", encode({**VALID, "scm_data": {"lot": ""}})),
    ("blank event id", encode({**VALID, "event_id": "\u2003"})),
    (
        "duplicate top-level key",
        b'{"constraints":{"extended_id":"a"},"scm_data":{"a":"b"},"scm_data":{"a":"c"}}',
    ),
    ("duplicate scm key", b'{"constraints":{"extended_id":"a"},"scm_data":{"a":"b","a":"c"}}'),
    (
        "duplicate key with spaces",
        b'{"constraints" : {"extended_id" : "a"}, "scm_data" : {"a" : "b", "a" : "c"}}',
    ),
    ("colon in a value", encode({**VALID, "event_id": 'x":y', "reference": "a:b"})),
    ("duplicate value", encode({**VALID, "constraints": {"extended_id": ["a", "b", "a"]}})),
    ("single value", encode({**VALID, "constraints": {"rfid": "E280"}})),
    ("forbidden constraint key", encode({**VALID, "constraints": {"product": ["a"]}})),
    ("message constraint key", encode({**VALID, "constraints": {"message": ["a"]}})),
    ("immutable scm key", encode({**VALID, "scm_data": {"serial_number": "1"}})),
    ("status scm key", encode({**VALID, "scm_data": {"status": "1"}})),
    ("activation status 3", encode({**VALID, "scm_data": {"activation_status": "3"}})),
    ("activation status 1", encode({**VALID, "scm_data": {"activation_status": "1"}})),
    ("blacklist reason 10", encode({**VALID, "scm_data": {"blacklist_reason": "10"}})),
    ("blacklist reason 11", encode({**VALID, "scm_data": {"blacklist_reason": "11"}})),
    ("numbers in scm_data", encode({**VALID, "scm_data": {"lot": 7, "weight": 1.5}})),
    (
        "unsorted dates, not ISO",
        encode(
            {
                **VALID,
                "scm_data": {
                    "z_date": "27.11.2026",
                    "lot": "L1",
                    "date": "2026-02-30",
                    "a_date": "2026-11-27",
                },
            }
        ),
    ),
    ("unknown field", encode({**VALID, "campain": 11})),
    ("two constraint keys", encode({**VALID, "constraints": {"a": ["1"], "b": ["2"]}})),
    ("five constraint keys", encode({**VALID, "constraints": {k: k for k in "abcde"}})),
    ("six constraint keys", encode({**VALID, "constraints": {k: k for k in "abcdef"}})),
    ("same value, two keys", encode({**VALID, "constraints": {"a": ["1"], "b": "1"}})),
    ("duplicate in a second key", encode({**VALID, "constraints": {"a": "1", "b": ["2", "2"]}})),
    ("forbidden second key", encode({**VALID, "constraints": {"a": "1", "product": "2"}})),
    (
        "several keys over a request",
        encode({**VALID, "constraints": {"a": list(map(str, range(501))), "b": ["x"] * 1}}),
    ),
    (
        "several keys, 1000 values in all",
        encode({**VALID, "constraints": {"a": list(map(str, range(999))), "b": ["x"]}}),
    ),
    ("empty list", encode({**VALID, "constraints": {"extended_id": []}})),
    ("too long value", encode({**VALID, "constraints": {"extended_id": ["x" * 1025]}})),
    ("longest value", encode({**VALID, "constraints": {"extended_id": ["x" * 1024]}})),
    ("non-ASCII value", encode({**VALID, "constraints": {"extended_id": ["Ü 1 é"]}})),
    ("escaped quote", encode({**VALID, "scm_data": {"lot": 'L"1'}})),
    ("null optional fields", encode({**VALID, "event_id": None, "campaign": None})),
    ("NUL in a value", encode({**VALID, "constraints": {"extended_id": ["0A\x0070"]}})),
    ("escape sequence", encode({**VALID, "constraints": {"extended_id": ["\x1b[31m0A70"]}})),
    ("bidi override", encode({**VALID, "scm_data": {"lot": "L\u202e1"}})),
    ("zero-width space", encode({**VALID, "scm_data": {"lot": "L\u200b1"}})),
    ("newline in a reference", encode({**VALID, "reference": "line 7\nshift B"})),
    ("BOM in an event id", encode({**VALID, "event_id": "e\ufeff1"})),
    ("next line inside", encode({**VALID, "constraints": {"extended_id": ["0A\x8570"]}})),
    ("Unicode 15 format control", encode({**VALID, "scm_data": {"lot": "L\U000134391"}})),
    ("letters of many scripts", encode({**VALID, "reference": "Zürich ß 東京 Привет مرحبا"})),
]


@pytest.mark.parametrize(
    ("raw"), [raw for _, raw in CORNER_CASES], ids=[n for n, _ in CORNER_CASES]
)
def test_corner_cases_get_the_validators_verdict(raw: bytes) -> None:
    assert_same_verdict(raw)
    result = parse_event(raw)
    slow = judged(raw)
    assert type(result) is type(slow)
    if isinstance(slow, Rejection):
        assert result == slow
    else:
        assert isinstance(result, ParsedEvent)
        assert result.event == slow.event
        assert result.warnings == slow.warnings


def test_a_key_with_a_trailing_newline_is_refused() -> None:
    result = parse_event(encode({**VALID, "constraints": {"extended_id\n": ["a"]}}))
    assert isinstance(result, Rejection)
    assert result.reason is Reason.CONSTRAINT_KEY_INVALID


def test_an_event_with_several_keys_takes_the_shortcut_within_a_requests_bounds() -> None:
    raw = encode({**VALID, "constraints": {"extended_id": ["a", "b"], "rfid": "r"}})
    fast = shortcut(raw)
    assert fast is not None
    assert fast.event.constraints == {"extended_id": ("a", "b"), "rfid": ("r",)}
    assert_same_verdict(raw)
    tight = ContractLimits(batch_max_values=2)
    assert shortcut(raw, tight) is None
    result = parse_event(raw, tight)
    assert isinstance(result, Rejection)
    assert result.reason is Reason.MULTI_KEY_TOO_MANY_VALUES
    small = ContractLimits(batch_max_bytes=2)
    assert shortcut(raw, small) is None
    result = parse_event(raw, small)
    assert isinstance(result, Rejection)
    assert result.reason is Reason.MULTI_KEY_TOO_MANY_BYTES


def test_settable_limits_are_compiled_in() -> None:
    limits = ContractLimits(max_value_length=3, max_scm_data_keys=1)
    assert shortcut(encode({**VALID, "constraints": {"extended_id": ["abcd"]}}), limits) is None
    result = parse_event(encode({**VALID, "constraints": {"extended_id": ["abcd"]}}), limits)
    assert isinstance(result, Rejection)
    assert result.reason is Reason.CONSTRAINT_VALUE_TOO_LONG
    assert shortcut(encode({**VALID, "constraints": {"extended_id": ["abc"]}}), limits) is not None
    assert isinstance(parse_event(encode(VALID)), ParsedEvent)  # the defaults again


def test_the_scm_data_memory_is_bounded() -> None:
    for number in range(parsing.SCM_DATA_VERDICTS_MAX + 10):
        assert shortcut(encode({**VALID, "scm_data": {"lot": f"L{number}"}})) is not None
        assert len(parsing._scm_data_verdicts) <= parsing.SCM_DATA_VERDICTS_MAX


awkward_text = st.text(
    alphabet=st.sampled_from(["a", "Z", "0", " ", "\t", "\n", "\x1c", "\xa0", "\u2003", "é", '"',
                              ":", "\\", "-", "_", "\x00", "\x85", "\u200b", "\u202e",
                              "\U00013439", "東"]),
    max_size=6,
)  # fmt: skip
keys = st.sampled_from(["extended_id", "rfid", "lot", "production_date", "date",
                        "activation_status", "blacklist_reason", "message", "status", "x y"]) \
    | awkward_text  # fmt: skip
scalars = awkward_text | st.integers(-3, 12) | st.floats(allow_nan=False) | st.none()
documents = st.fixed_dictionaries(
    {
        "constraints": st.dictionaries(
            keys, scalars | st.lists(scalars, max_size=4), min_size=0, max_size=6
        ),
        "scm_data": st.dictionaries(keys, scalars, min_size=0, max_size=4),
    },
    optional={
        "event_id": scalars,
        "campaign": st.none() | st.integers(-1, 3) | st.floats(0, 3) | st.booleans(),
        "reference": scalars,
        "expected_codes": st.none() | st.integers(-1, 3) | st.booleans(),
    },
)


@settings(max_examples=1000)
@given(documents)
def test_generated_events_get_the_validators_verdict(document: dict[str, Any]) -> None:
    assert_same_verdict(encode(document))
