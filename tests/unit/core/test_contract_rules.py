"""Each rule of the change-event contract: its reason code, the field it names, its fix."""

from __future__ import annotations

import json
from typing import Any

import pytest

from service.core.contract_limits import ContractLimits
from service.core.parsing import ParsedEvent, parse_event
from service.core.reasons import Reason, Rejection, Stage
from tests.unit.relay.support import expected_codes


def event(**fields: Any) -> dict[str, Any]:
    """A valid event with `fields` replaced (a value of ... removes the field)."""
    base: dict[str, Any] = {
        "constraints": {"extended_id": ["0A70X1"]},
        "scm_data": {"intended_market": "DE"},
    }
    base.update(fields)
    return {name: value for name, value in base.items() if value is not ...}


def encode(document: Any) -> bytes:
    return json.dumps(document).encode()


def accepted(raw: bytes, limits: ContractLimits | None = None) -> ParsedEvent:
    result = parse_event(raw) if limits is None else parse_event(raw, limits)
    assert isinstance(result, ParsedEvent), result
    return result


def refused(raw: bytes, limits: ContractLimits | None = None) -> Rejection:
    result = parse_event(raw) if limits is None else parse_event(raw, limits)
    assert isinstance(result, Rejection), result
    return result


RULES: list[tuple[str, bytes, Reason, str | None, str]] = [
    # (id, record, reason, field, a fragment the message must contain)
    ("not utf-8", b'{"a": "\xff"}', Reason.NOT_UTF8, None, "UTF-8"),
    ("not json", b"{'single': 'quotes'}", Reason.INVALID_JSON, None, "not valid JSON"),
    ("empty record", b"", Reason.INVALID_JSON, None, "not valid JSON"),
    ("array", b"[1, 2]", Reason.NOT_AN_OBJECT, None, "JSON object"),
    ("string", b'"text"', Reason.NOT_AN_OBJECT, None, "JSON object"),
    ("nested", b"[" * 500 + b"]" * 500, Reason.TOO_DEEPLY_NESTED, None, "nested"),
    ("unknown field", encode(event(campain=11)), Reason.UNKNOWN_FIELD, "campain", "campaign"),
    ("no constraints", encode(event(constraints=...)), Reason.MISSING_FIELD, "constraints",
     "extended_id"),
    ("no scm_data", encode(event(scm_data=...)), Reason.MISSING_FIELD, "scm_data", "required"),
    ("event_id number", encode(event(event_id=7)), Reason.EVENT_ID_INVALID, "event_id",
     "non-blank string"),
    ("event_id blank", encode(event(event_id=" ")), Reason.EVENT_ID_INVALID, "event_id",
     "non-blank"),
    ("event_id long", encode(event(event_id="e" * 257)), Reason.EVENT_ID_TOO_LONG, "event_id",
     "limit is 256"),
    ("constraints list", encode(event(constraints=["0A70X1"])), Reason.CONSTRAINTS_NOT_OBJECT,
     "constraints", "one to five keys"),
    ("six keys", encode(event(constraints={k: "a" for k in ("k1", "k2", "k3", "k4", "k5", "k6")})),
     Reason.CONSTRAINTS_KEY_COUNT, "constraints", "1 to 5 keys, found 6 ('k1'"),
    ("several keys, over a request's values",
     encode(event(constraints={"extended_id": [f"a{n}" for n in range(600)],
                               "serial_number": [f"s{n}" for n in range(401)]})),
     Reason.MULTI_KEY_TOO_MANY_VALUES, "constraints", "its 1001 values exceed the 1000"),
    ("several keys, over a request's bytes",
     encode(event(constraints={"extended_id": [f"{n:04}" + "x" * 996 for n in range(150)],
                               "serial_number": [f"{n:04}" + "s" * 996 for n in range(150)]})),
     Reason.MULTI_KEY_TOO_MANY_BYTES, "constraints", "300000 bytes (UTF-8), over the 262144"),
    ("several keys, one forbidden", encode(event(constraints={"extended_id": "a", "product": "p"})),
     Reason.CONSTRAINT_KEY_FORBIDDEN, "constraints.product", "not allowed"),
    ("several keys, a duplicate in one",
     encode(event(constraints={"extended_id": "a", "rfid": ["r1", "r1"]})),
     Reason.CONSTRAINT_VALUE_DUPLICATE, "constraints.rfid[1]", "duplicates index 0"),
    ("several keys, a blank value in one",
     encode(event(constraints={"extended_id": "a", "rfid": ["r1", ""]})),
     Reason.CONSTRAINT_VALUE_BLANK, "constraints.rfid[1]", "blank"),
    ("no keys", encode(event(constraints={})), Reason.CONSTRAINTS_KEY_COUNT, "constraints",
     "found 0"),
    ("message key", encode(event(constraints={"message": "a"})), Reason.CONSTRAINT_KEY_MESSAGE,
     "constraints.message", "use 'extended_id'"),
    ("product key", encode(event(constraints={"product": "a"})), Reason.CONSTRAINT_KEY_FORBIDDEN,
     "constraints.product", "not allowed"),
    ("product_id key", encode(event(constraints={"product_id": "a"})),
     Reason.CONSTRAINT_KEY_FORBIDDEN, "constraints.product_id", "not allowed"),
    ("campaign key", encode(event(constraints={"campaign": 11})), Reason.CONSTRAINT_KEY_FORBIDDEN,
     "constraints.campaign", "top-level 'campaign'"),
    ("campaign_id key", encode(event(constraints={"campaign_id": 11})),
     Reason.CONSTRAINT_KEY_FORBIDDEN, "constraints.campaign_id", "top-level 'campaign'"),
    ("key with space", encode(event(constraints={"extended id": "a"})),
     Reason.CONSTRAINT_KEY_INVALID, "constraints", "letters, digits"),
    ("key too long", encode(event(constraints={"k" * 129: "a"})), Reason.CONSTRAINT_KEY_INVALID,
     "constraints", "longer than 128"),
    ("empty list", encode(event(constraints={"extended_id": []})), Reason.CONSTRAINT_VALUES_EMPTY,
     "constraints.extended_id", "at least one"),
    ("bool value", encode(event(constraints={"extended_id": ["a", True]})),
     Reason.CONSTRAINT_VALUE_INVALID, "constraints.extended_id[1]", "string"),
    ("float value", encode(event(constraints={"serial_number": 1.5})),
     Reason.CONSTRAINT_VALUE_INVALID, "constraints.serial_number", "string"),
    ("null value", encode(event(constraints={"extended_id": None})),
     Reason.CONSTRAINT_VALUE_INVALID, "constraints.extended_id", "string"),
    ("blank value", encode(event(constraints={"extended_id": ["a", " \t"]})),
     Reason.CONSTRAINT_VALUE_BLANK, "constraints.extended_id[1]", "blank"),
    ("long value", encode(event(constraints={"extended_id": "x" * 1025})),
     Reason.CONSTRAINT_VALUE_TOO_LONG, "constraints.extended_id", "limit is 1024"),
    ("duplicate", encode(event(constraints={"extended_id": ["a", "b", "a"]})),
     Reason.CONSTRAINT_VALUE_DUPLICATE, "constraints.extended_id[2]", "duplicates index 0"),
    ("value with spaces around", encode(event(constraints={"extended_id": ["a", " a "]})),
     Reason.CONSTRAINT_VALUE_WHITESPACE, "constraints.extended_id[1]", "white space around"),
    ("value with a newline after", encode(event(constraints={"rfid": "E28011\n"})),
     Reason.CONSTRAINT_VALUE_WHITESPACE, "constraints.rfid", "exactly"),
    ("scm value with spaces around", encode(event(scm_data={"intended_market": "DE "})),
     Reason.SCM_DATA_VALUE_WHITESPACE, "scm_data.intended_market", "white space around"),
    ("activation status padded", encode(event(scm_data={"activation_status": " 1"})),
     Reason.SCM_DATA_VALUE_WHITESPACE, "scm_data.activation_status", "white space around"),
    ("duplicate key",
     b'{"constraints": {"extended_id": ["a"]}, "scm_data": {"lot": "1", "lot": "2"}}',
     Reason.DUPLICATE_KEY, "lot", "appears twice"),
    ("duplicate constraints",
     b'{"constraints": {"extended_id": ["a"]}, "constraints": {"extended_id": ["b"]}, '
     b'"scm_data": {"lot": "1"}}',
     Reason.DUPLICATE_KEY, "constraints", "appears twice"),
    ("duplicate number", encode(event(constraints={"serial_number": [7, "7"]})),
     Reason.CONSTRAINT_VALUE_DUPLICATE, "constraints.serial_number[1]", "'7'"),
    ("scm_data list", encode(event(scm_data=["DE"])), Reason.SCM_DATA_NOT_OBJECT, "scm_data",
     "object"),
    ("scm_data empty", encode(event(scm_data={})), Reason.SCM_DATA_EMPTY, "scm_data",
     "at least one"),
    ("too many keys", encode(event(scm_data={f"f{i}": "v" for i in range(101)})),
     Reason.SCM_DATA_TOO_MANY_KEYS, "scm_data", "limit is 100"),
    ("set extended_id", encode(event(scm_data={"extended_id": "x"})),
     Reason.SCM_DATA_KEY_IMMUTABLE, "scm_data.extended_id", "can not be changed"),
    ("set serial_number", encode(event(scm_data={"serial_number": "x"})),
     Reason.SCM_DATA_KEY_IMMUTABLE, "scm_data.serial_number", "can not be changed"),
    ("set message", encode(event(scm_data={"message": "x"})), Reason.SCM_DATA_KEY_IMMUTABLE,
     "scm_data.message", "can not be changed"),
    ("product_id", encode(event(scm_data={"product_id": "x"})), Reason.SCM_DATA_KEY_PRODUCT_ID,
     "scm_data.product_id", "use 'product'"),
    ("status", encode(event(scm_data={"status": 1})), Reason.SCM_DATA_KEY_STATUS,
     "scm_data.status", "use 'activation_status'"),
    ("bad key", encode(event(scm_data={"intended-market!": "x"})), Reason.SCM_DATA_KEY_INVALID,
     "scm_data", "letters, digits"),
    ("null value", encode(event(scm_data={"m": None})), Reason.SCM_DATA_VALUE_INVALID,
     "scm_data.m", "string or a number"),
    ("bool value", encode(event(scm_data={"m": False})), Reason.SCM_DATA_VALUE_INVALID,
     "scm_data.m", "string or a number"),
    ("object value", encode(event(scm_data={"m": {"a": 1}})), Reason.SCM_DATA_VALUE_INVALID,
     "scm_data.m", "string or a number"),
    ("long value", encode(event(scm_data={"m": "v" * 1025})), Reason.SCM_DATA_VALUE_TOO_LONG,
     "scm_data.m", "limit is 1024"),
    ("activation 3", encode(event(scm_data={"activation_status": 3})),
     Reason.ACTIVATION_STATUS_INVALID, "scm_data.activation_status", "0 (inactive)"),
    ("activation word", encode(event(scm_data={"activation_status": "active"})),
     Reason.ACTIVATION_STATUS_INVALID, "scm_data.activation_status", "2 (blacklisted)"),
    ("blacklist 11", encode(event(scm_data={"blacklist_reason": 11})),
     Reason.BLACKLIST_REASON_INVALID, "scm_data.blacklist_reason", "0 to 10"),
    ("blacklist -1", encode(event(scm_data={"blacklist_reason": "-1"})),
     Reason.BLACKLIST_REASON_INVALID, "scm_data.blacklist_reason", "0 to 10"),
    ("campaign string", encode(event(campaign="11")), Reason.CAMPAIGN_TYPE, "campaign",
     "Incorrect type. Expected pk value, received str."),
    ("campaign bool", encode(event(campaign=True)), Reason.CAMPAIGN_TYPE, "campaign",
     "Expected pk value, received bool"),
    ("campaign float", encode(event(campaign=1.5)), Reason.CAMPAIGN_TYPE, "campaign",
     "Expected pk value, received float"),
    ("campaign zero", encode(event(campaign=0)), Reason.CAMPAIGN_NOT_POSITIVE, "campaign",
     "positive"),
    ("reference number", encode(event(reference=5)), Reason.REFERENCE_INVALID, "reference",
     "string"),
    ("reference long", encode(event(reference="r" * 256)), Reason.REFERENCE_TOO_LONG,
     "reference", "limit is 255"),
    ("NUL in a code", encode(event(constraints={"extended_id": ["a", "0A\x0070"]})),
     Reason.CONSTRAINT_VALUE_CONTROL_CHARACTER, "constraints.extended_id[1]",
     "the control character U+0000 at index 2"),
    ("zero-width space in a code", encode(event(constraints={"rfid": "E28\u200b01"})),
     Reason.CONSTRAINT_VALUE_CONTROL_CHARACTER, "constraints.rfid",
     "U+200B ZERO WIDTH SPACE at index 3"),
    ("bidi override in scm value", encode(event(scm_data={"market": "D\u202eE"})),
     Reason.SCM_DATA_VALUE_CONTROL_CHARACTER, "scm_data.market",
     "U+202E RIGHT-TO-LEFT OVERRIDE at index 1"),
    ("escape sequence in scm value", encode(event(scm_data={"market": "\x1b[1mDE"})),
     Reason.SCM_DATA_VALUE_CONTROL_CHARACTER, "scm_data.market", "U+001B at index 0"),
    ("newline in reference", encode(event(reference="line 7\nshift B")),
     Reason.REFERENCE_CONTROL_CHARACTER, "reference", "U+000A at index 6"),
    ("tab in event_id", encode(event(event_id="mes\t7")), Reason.EVENT_ID_CONTROL_CHARACTER,
     "event_id", "U+0009 at index 3"),
    ("NUL in a key", encode(event(constraints={"extended_id\x00": "a"})),
     Reason.CONSTRAINT_KEY_INVALID, "constraints", "U+0000 at index 11"),
    ("expected negative", encode(event(expected_codes=-1)), Reason.EXPECTED_CODES_INVALID,
     "expected_codes", "0 or more"),
    ("expected string", encode(event(expected_codes="2")), Reason.EXPECTED_CODES_INVALID,
     "expected_codes", "whole number"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("raw", "reason", "field", "fragment"),
    [rule[1:] for rule in RULES],
    ids=[rule[0] for rule in RULES],
)
def test_rule(raw: bytes, reason: Reason, field: str | None, fragment: str) -> None:
    rejection = refused(raw)
    assert rejection.reason is reason
    assert rejection.field == field
    assert fragment in rejection.message
    expected_stage = Stage.DECODE if reason.stage is Stage.DECODE else Stage.VALIDATE
    assert rejection.stage is expected_stage


def test_every_record_level_reason_has_a_rule_test() -> None:
    tested = {rule[2] for rule in RULES} | {Reason.RECORD_TOO_LARGE, Reason.TOO_MANY_VALUES}
    assert set(Reason) - tested == {Reason.API_REJECTED}


def test_record_over_the_byte_limit_is_refused_before_decoding() -> None:
    fits = encode(event())
    limits = ContractLimits(max_record_bytes=len(fits))
    accepted(fits, limits)
    raw = encode(event(event_id="x"))
    rejection = refused(raw, limits)
    assert rejection.reason is Reason.RECORD_TOO_LARGE
    assert f"{len(raw)} bytes; the limit is {len(fits)}" in rejection.message
    # Even bytes that are not UTF-8 are refused for their size first.
    assert refused(b"\xff" * (len(fits) + 1), limits).reason is Reason.RECORD_TOO_LARGE


def test_values_per_event_limit() -> None:
    limits = ContractLimits(max_values_per_event=3)
    accepted(encode(event(constraints={"extended_id": ["a", "b", "c"]})), limits)
    rejection = refused(encode(event(constraints={"extended_id": ["a", "b", "c", "d"]})), limits)
    assert rejection.reason is Reason.TOO_MANY_VALUES
    assert rejection.field == "constraints.extended_id"
    assert "4 values exceed the limit of 3" in rejection.message


def test_settable_limits_are_honoured() -> None:
    limits = ContractLimits(
        max_scm_data_keys=1, max_key_length=3, max_value_length=2, max_reference_length=1
    )
    base = {"constraints": {"abc": "ab"}, "scm_data": {"m": "v"}}
    accepted(encode(base), limits)
    too_many = refused(encode({**base, "scm_data": {"a": "1", "b": "2"}}), limits)
    assert too_many.reason is Reason.SCM_DATA_TOO_MANY_KEYS
    assert refused(encode({**base, "constraints": {"abcd": "a"}}), limits).reason is (
        Reason.CONSTRAINT_KEY_INVALID
    )
    assert refused(encode({**base, "constraints": {"abc": "abc"}}), limits).reason is (
        Reason.CONSTRAINT_VALUE_TOO_LONG
    )
    assert refused(encode({**base, "reference": "ab"}), limits).reason is Reason.REFERENCE_TOO_LONG


def test_values_are_sent_as_published_as_strings_keeping_case_and_inner_spaces() -> None:
    parsed = accepted(
        encode(
            {
                "constraints": {"extended_id": ["0a70X1", "Code With  Spaces", 12345678901]},
                "scm_data": {
                    "lot": 42,
                    "weight_kg": 12.5,
                    "market": "De",
                    "activation_status": 1,
                },
            }
        )
    )
    assert parsed.event.constraints == {
        "extended_id": ("0a70X1", "Code With  Spaces", "12345678901")
    }
    assert parsed.event.scm_data == {
        "activation_status": "1",
        "lot": "42",
        "market": "De",
        "weight_kg": "12.5",
    }


def test_single_value_constraint_becomes_a_one_value_list() -> None:
    parsed = accepted(encode(event(constraints={"rfid": "E2801160"})))
    assert parsed.event.constraints == {"rfid": ("E2801160",)}


def test_optional_fields_are_carried() -> None:
    parsed = accepted(
        encode(event(event_id="mes-1", campaign=11, reference="line 7", expected_codes=2))
    )
    assert (parsed.event.event_id, parsed.event.campaign) == ("mes-1", 11)
    assert (parsed.event.reference, parsed.event.expected_codes) == ("line 7", 2)


@pytest.mark.parametrize("key", ["production_date", "date", "expiry_date"])
def test_non_iso_date_is_accepted_with_a_warning(key: str) -> None:
    parsed = accepted(encode(event(scm_data={key: "27/11/2026"})))
    assert parsed.event.scm_data[key] == "27/11/2026"
    (warning,) = parsed.warnings
    assert f"scm_data.{key}" in warning
    assert "YYYY-MM-DD" in warning


@pytest.mark.parametrize(
    ("key", "value"),
    [("production_date", "2026-11-27"), ("dated", "soon"), ("update", "x"), ("date_code", "7")],
)
def test_iso_dates_and_non_date_keys_raise_no_warning(key: str, value: str) -> None:
    assert accepted(encode(event(scm_data={key: value}))).warnings == ()


def test_impossible_calendar_date_is_flagged() -> None:
    assert accepted(encode(event(scm_data={"production_date": "2026-02-30"}))).warnings


def test_activation_and_blacklist_accept_numbers_and_numeric_strings() -> None:
    parsed = accepted(encode(event(scm_data={"activation_status": "2", "blacklist_reason": 10})))
    assert parsed.event.scm_data == {"activation_status": "2", "blacklist_reason": "10"}


def test_several_problems_report_the_first_and_count_the_rest() -> None:
    rejection = refused(encode(event(scm_data={"status": 1}, campaign="11", extra=1)))
    assert rejection.reason is Reason.SCM_DATA_KEY_STATUS
    assert rejection.further_problems == 2


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"constraints": {"extended_id": ["a", "b"]}}, 2),
        ({"constraints": {"serial_number": "a"}}, 1),
        ({"constraints": {"rfid": ["a", "b", "c"]}}, 3),
        ({"constraints": {"pallet_sscc": "0034"}}, None),
        ({"constraints": {"pallet_sscc": "0034"}, "expected_codes": 240}, 240),
        ({"constraints": {"extended_id": ["a", "b"]}, "expected_codes": 0}, 0),
    ],
)
def test_expected_codes(fields: dict[str, Any], expected: int | None) -> None:
    assert expected_codes(accepted(encode(event(**fields))).event) == expected


def test_one_code_per_value_keys_is_settable() -> None:
    parsed = accepted(encode(event(constraints={"case_id": ["c1", "c2"]})))
    assert expected_codes(parsed.event) is None
    limits = ContractLimits(one_code_per_value_keys=frozenset({"case_id"}))
    assert expected_codes(parsed.event, limits) == 2
    assert expected_codes(accepted(encode(event(constraints={"rfid": "r"}))).event, limits) is None


def test_a_value_holding_a_quote_and_colon_is_no_duplicate_key() -> None:
    raw = b'{"constraints": {"extended_id": ["a\\":b"]}, "scm_data": {"note": "x\\" : y"}}'
    parsed = accepted(raw)
    assert parsed.event.constraints == {"extended_id": ('a":b',)}
    assert parsed.event.scm_data == {"note": 'x" : y'}


MULTI_KEY_EVENTS = [
    {"extended_id": ["0A70X1", "0A70X2"], "rfid": "E2801"},
    {"extended_id": "a", "serial_number": "s", "rfid": "r", "lot": "l"},
    {"extended_id": "a", "serial_number": "s", "rfid": "r", "lot": "l", "pallet_sscc": 7},
]


@pytest.mark.parametrize("constraints", MULTI_KEY_EVENTS, ids=["2 keys", "4 keys", "5 keys"])
def test_an_event_may_have_up_to_five_constraint_keys_each_kept_as_published(
    constraints: dict[str, Any],
) -> None:
    parsed = accepted(encode(event(constraints=constraints)))
    assert parsed.event.constraints == {
        key: tuple(str(v) for v in (values if isinstance(values, list) else [values]))
        for key, values in constraints.items()
    }
    assert list(parsed.event.constraints) == list(constraints)  # the publisher's key order


def test_the_same_value_under_two_keys_is_no_duplicate() -> None:
    # A different field: serial number "7" and rfid "7" may be two codes.
    parsed = accepted(encode(event(constraints={"serial_number": "7", "rfid": ["7", "8"]})))
    assert parsed.event.constraints == {"serial_number": ("7",), "rfid": ("7", "8")}
    assert parsed.event.value_count == 3


def test_several_keys_must_fit_one_request_of_the_relays_bounds() -> None:
    limits = ContractLimits(batch_max_values=3, batch_max_bytes=8)
    fits = event(constraints={"extended_id": ["ab", "cd"], "rfid": "ef"})
    accepted(encode(fits), limits)
    over = refused(encode(event(constraints={"extended_id": ["ab", "cd"], "rfid": ["ef", "g"]})),
                   limits)  # fmt: skip
    assert over.reason is Reason.MULTI_KEY_TOO_MANY_VALUES
    assert "2 constraint keys is sent as one request" in over.message
    assert "4 values exceed the 3" in over.message
    # Counted in UTF-8 bytes: "ab" "cd" "ef" are 6, "ab" "cd" "éfé" 9.
    too_big = refused(encode(event(constraints={"extended_id": ["ab", "cd"], "rfid": "éfé"})),
                      limits)  # fmt: skip
    assert too_big.reason is Reason.MULTI_KEY_TOO_MANY_BYTES
    assert "its values are 9 bytes (UTF-8), over the 8" in too_big.message
    # A single key is merged and split freely: the request bounds do not apply.
    accepted(encode(event(constraints={"extended_id": ["ab", "cd", "ef", "gh", "ij"]})), limits)


def test_the_values_per_event_limit_counts_every_key() -> None:
    limits = ContractLimits(max_values_per_event=3)
    rejection = refused(
        encode(event(constraints={"extended_id": ["a", "b"], "rfid": ["c", "d"]})), limits
    )
    assert (rejection.reason, rejection.field) == (Reason.TOO_MANY_VALUES, "constraints")
    assert "4 values exceed the limit of 3" in rejection.message


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        # Every key one code per value: all values (keys read as a union of codes).
        ({"constraints": {"extended_id": ["a", "b"], "serial_number": "s"}}, 3),
        ({"constraints": {"rfid": ["a", "b"], "serial_number": ["a", "s"]}}, 4),
        # One key that is not: unknown.
        ({"constraints": {"extended_id": ["a", "b"], "pallet_sscc": "0034"}}, None),
        # Declared: what it says.
        ({"constraints": {"extended_id": "a", "pallet_sscc": "0034"}, "expected_codes": 40}, 40),
        ({"constraints": {"extended_id": ["a", "b"], "rfid": "r"}, "expected_codes": 1}, 1),
    ],
)
def test_expected_codes_of_an_event_with_several_keys(
    fields: dict[str, Any], expected: int | None
) -> None:
    assert expected_codes(accepted(encode(event(**fields))).event) == expected
