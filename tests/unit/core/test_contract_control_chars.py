"""No string of an event holds a control or format character, for every code point.

Every code point (0..0x10FFFF but the surrogates, which cannot be in UTF-8) is put
inside a constraint value, an scm_data value, a reference and an event id, and
judged by the whole `parse_event`. Code points outside the refused set go in chunks
(200 to a string, 50 strings to an event, so the 1.1 million take about a second):
each chunk is accepted unchanged, by the compiled contract itself (no fallback to
the validators) with the validators' own result. Each refused code point goes
alone and is refused with its field's reason, its code point and its index, by the
validators (the compiled contract leaves it to them).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.core import parsing
from service.core.contract_limits import DEFAULT_LIMITS
from service.core.control_chars import first_control, is_control
from service.core.parsing import ParsedEvent, parse_event
from service.core.reasons import Reason, Rejection

CODE_POINTS = [cp for cp in range(sys.maxunicode + 1) if not 0xD800 <= cp <= 0xDFFF]
ALLOWED = [cp for cp in CODE_POINTS if not is_control(cp)]
REFUSED = [cp for cp in CODE_POINTS if is_control(cp)]
BASE: dict[str, Any] = {"constraints": {"extended_id": ["0A70X1"]}, "scm_data": {"lot": "L1"}}


def encode(document: dict[str, Any]) -> bytes:
    return json.dumps(document, ensure_ascii=False).encode()


def inner_strings(size: int = 200) -> Iterator[str]:
    """Every allowed code point, inside strings that start and end with a letter."""
    for start in range(0, len(ALLOWED), size):
        yield "a" + "".join(map(chr, ALLOWED[start : start + size])) + "z"


def groups(strings: Iterator[str], size: int) -> Iterator[list[str]]:
    group: list[str] = []
    for text in strings:
        group.append(text)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group


def accepted_by_both_paths(raw: bytes) -> ParsedEvent:
    result = parse_event(raw)
    assert isinstance(result, ParsedEvent), result
    fast = parsing._accept_compiled(raw, DEFAULT_LIMITS)
    assert fast is not None, "a valid event fell back to the validators"
    slow = parsing._judge(raw, DEFAULT_LIMITS)
    assert isinstance(slow, ParsedEvent)
    assert fast.event == slow.event == result.event
    return result


def test_every_allowed_code_point_passes_unchanged_in_constraint_and_scm_values() -> None:
    for group in groups(inner_strings(), 50):
        raw = encode({**BASE, "constraints": {"extended_id": group}})
        assert accepted_by_both_paths(raw).event.constraints == {"extended_id": tuple(group)}
        scm_data = {f"f{number}": text for number, text in enumerate(group)}
        raw = encode({**BASE, "scm_data": scm_data})
        assert accepted_by_both_paths(raw).event.scm_data == scm_data


def test_every_allowed_code_point_passes_unchanged_in_reference_and_event_id() -> None:
    for text in inner_strings():
        event = accepted_by_both_paths(encode({**BASE, "reference": text, "event_id": text}))
        assert (event.event.reference, event.event.event_id) == (text, text)


FIELDS: list[tuple[str, Reason, str]] = [
    # (where the string goes, the reason, the field named)
    ("constraint", Reason.CONSTRAINT_VALUE_CONTROL_CHARACTER, "constraints.extended_id[0]"),
    ("scm_data", Reason.SCM_DATA_VALUE_CONTROL_CHARACTER, "scm_data.lot"),
    ("reference", Reason.REFERENCE_CONTROL_CHARACTER, "reference"),
    ("event_id", Reason.EVENT_ID_CONTROL_CHARACTER, "event_id"),
]


def placed(where: str, text: str) -> dict[str, Any]:
    if where == "constraint":
        return {**BASE, "constraints": {"extended_id": [text]}}
    if where == "scm_data":
        return {**BASE, "scm_data": {"lot": text}}
    return {**BASE, where: text}


@pytest.mark.parametrize(("where", "reason", "field"), FIELDS, ids=[f[0] for f in FIELDS])
def test_every_refused_code_point_is_refused_naming_it_and_its_index(
    where: str, reason: Reason, field: str
) -> None:
    assert len(REFUSED) == 235
    for cp in REFUSED:
        raw = encode(placed(where, f"a{chr(cp)}z"))
        assert parsing._accept_compiled(raw, DEFAULT_LIMITS) is None, hex(cp)
        result = parse_event(raw)
        assert isinstance(result, Rejection), hex(cp)
        assert (result.reason, result.field) == (reason, field), hex(cp)
        assert f"U+{cp:04X}" in result.message
        assert "at index 1:" in result.message
        assert first_control(result.message) is None  # the message itself stays printable


@pytest.mark.parametrize(
    ("text", "code_point", "index"),
    [
        ("0A70\x00X1", "U+0000", 4),
        ("\x1b[31mRED\x1b[0m", "U+001B", 0),
        ("0A70X1\u202e1X07A0", "U+202E", 6),
        ("0A70\u200bX1", "U+200B", 4),
        ("0A\u00ad70X1", "U+00AD", 2),
        ("0A70\ufeffX1", "U+FEFF", 4),
        ("0A\x0770X1", "U+0007", 2),
    ],
)
def test_well_known_invisible_characters(text: str, code_point: str, index: int) -> None:
    for where, reason, field in FIELDS:
        result = parse_event(encode(placed(where, text)))
        assert isinstance(result, Rejection)
        assert (result.reason, result.field) == (reason, field)
        assert code_point in result.message
        assert f"at index {index}:" in result.message


def test_white_space_around_a_value_keeps_its_own_reason() -> None:
    for text in ("0A70X1\n", "\t0A70X1", "0A70X1\x1c"):
        result = parse_event(encode(placed("constraint", text)))
        assert isinstance(result, Rejection)
        assert result.reason is Reason.CONSTRAINT_VALUE_WHITESPACE
    blank = parse_event(encode(placed("event_id", "\t")))
    assert isinstance(blank, Rejection)
    assert blank.reason is Reason.EVENT_ID_INVALID


@settings(max_examples=400)
@given(st.sampled_from(FIELDS), st.text(max_size=40))
def test_generated_text_is_refused_exactly_when_it_holds_a_refused_character(
    target: tuple[str, Reason, str], text: str
) -> None:
    where, reason, field = target
    raw = encode(placed(where, f"a{text}z"))
    result = parse_event(raw)
    index = first_control(text)
    if index is None:
        assert accepted_by_both_paths(raw) == result
    else:
        assert isinstance(result, Rejection)
        assert (result.reason, result.field) == (reason, field)
        assert f"U+{ord(text[index]):04X}" in result.message
        assert f"at index {index + 1}:" in result.message
