"""Properties of the contract over generated input (hypothesis)."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from service.core.contract import ChangeEvent
from service.core.parsing import ParsedEvent, parse_event
from service.core.reasons import Reason, Rejection
from tests.unit.relay.support import batch_key

json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
field_names = st.sampled_from(
    ["event_id", "constraints", "scm_data", "campaign", "reference", "expected_codes", "x"]
)
keys = st.sampled_from(
    ["extended_id", "serial_number", "rfid", "message", "product", "status", "production_date",
     "activation_status", "blacklist_reason", "intended_market", "bad key", ""]
)  # fmt: skip
plain_values = st.text(max_size=10) | st.integers(-5, 10**12) | st.floats(allow_nan=False)
values = plain_values | st.none() | st.booleans() | st.lists(plain_values, max_size=5)
# Mostly-well-formed events: they reach every field validator, valid or not.
candidate_events = st.fixed_dictionaries(
    {
        "constraints": st.dictionaries(keys, values, min_size=0, max_size=2),
        "scm_data": st.dictionaries(keys, plain_values | st.none(), min_size=0, max_size=4),
    },
    optional={
        "event_id": st.none() | st.text(max_size=8) | st.integers(),
        "campaign": st.none() | st.integers(-2, 50) | st.text(max_size=3),
        "reference": st.none() | st.text(max_size=8),
        "expected_codes": st.none() | st.integers(-2, 5),
    },
)


def classify(raw: bytes) -> ParsedEvent | Rejection:
    result = parse_event(raw)
    assert isinstance(result, ParsedEvent | Rejection)
    return result


@given(st.binary(max_size=512))
def test_arbitrary_bytes_are_classified_never_raised(raw: bytes) -> None:
    result = classify(raw)
    if isinstance(result, Rejection):
        assert result.message


@given(json_values)
def test_arbitrary_json_is_classified(document: Any) -> None:
    classify(json.dumps(document).encode())


@given(st.dictionaries(field_names, json_values, max_size=6))
def test_arbitrary_objects_are_classified(document: dict[str, Any]) -> None:
    classify(json.dumps(document).encode())


@settings(max_examples=300)
@given(candidate_events)
def test_accepted_events_round_trip_with_the_same_batch_key(document: dict[str, Any]) -> None:
    first = classify(json.dumps(document).encode())
    if isinstance(first, Rejection):
        assert first.reason.value
        return
    again = classify(first.event.model_dump_json().encode())
    assert isinstance(again, ParsedEvent), again
    assert again.event == first.event
    assert batch_key(again.event) == batch_key(first.event)


def spelling_variants(scm_data: dict[str, int]) -> list[dict[str, Any]]:
    """Spellings of the same scm_data: reversed key order, numbers as strings."""
    return [
        dict(reversed(list(scm_data.items()))),
        {key: str(value) for key, value in scm_data.items()},
    ]


def parsed(constraints: dict[str, Any], scm_data: dict[str, Any], **extra: Any) -> ChangeEvent:
    result = classify(
        json.dumps({"constraints": constraints, "scm_data": scm_data, **extra}).encode()
    )
    assert isinstance(result, ParsedEvent), result
    return result.event


scm_field_names = st.from_regex(r"[a-z][a-z0-9_]{0,8}", fullmatch=True).filter(
    lambda k: (
        k not in {"status", "message", "product_id", "serial_number", "extended_id"}
        and k not in {"activation_status", "blacklist_reason"}
    )
)


@given(st.dictionaries(scm_field_names, st.integers(0, 10**6), min_size=1, max_size=5))
def test_spelling_never_splits_a_batch(scm_data: dict[str, int]) -> None:
    constraints = {"extended_id": ["0A70X1"]}
    key = batch_key(parsed(constraints, scm_data, campaign=11))
    for variant in spelling_variants(scm_data):
        assert batch_key(parsed({"extended_id": ["other"]}, variant, campaign=11)) == key


@given(
    st.dictionaries(scm_field_names, st.integers(0, 10**6), min_size=1, max_size=5),
    st.data(),
)
def test_different_values_always_split_a_batch(scm_data: dict[str, int], data: Any) -> None:
    constraints = {"extended_id": "0A70X1"}
    key = batch_key(parsed(constraints, scm_data))
    changed_field = data.draw(st.sampled_from(sorted(scm_data)))
    changed = {**scm_data, changed_field: scm_data[changed_field] + 1}
    assert batch_key(parsed(constraints, changed)) != key
    assert batch_key(parsed(constraints, scm_data, campaign=12)) != key
    assert batch_key(parsed(constraints, scm_data, reference="r")) != key
    assert batch_key(parsed({"serial_number": "0A70X1"}, scm_data)) != key
    assert batch_key(parsed(constraints, {**scm_data, "extra_field": "x"})) != key


def test_absent_and_empty_reference_share_a_batch() -> None:
    constraints, scm_data = {"extended_id": "a"}, {"m": "DE"}
    assert batch_key(parsed(constraints, scm_data)) == batch_key(
        parsed(constraints, scm_data, reference="")
    )


@given(
    st.dictionaries(scm_field_names, st.integers(0, 10**6), min_size=1, max_size=5),
    st.sampled_from([" ", "\t", "\n", "\u00a0"]),
)
def test_a_value_with_white_space_around_it_is_never_sent_trimmed(
    scm_data: dict[str, int], space: str
) -> None:
    padded = {key: f"{space}{value}" for key, value in scm_data.items()}
    raw = json.dumps({"constraints": {"extended_id": ["0A70X1"]}, "scm_data": padded}).encode()
    result = classify(raw)
    assert isinstance(result, Rejection)
    assert result.reason is Reason.SCM_DATA_VALUE_WHITESPACE
