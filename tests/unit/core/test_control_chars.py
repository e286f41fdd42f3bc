"""The refused set (service/core/control_chars.py) against Unicode's tables, and its three
spellings (the validators' Python regex, the compiled contract's Rust class, the JSON
Schema's pattern) against the set, for every code point."""

from __future__ import annotations

import itertools
import json
import re
import sys
import unicodedata

import regress
from jsonschema import Draft202012Validator
from pydantic import ValidationError
from pydantic_core import SchemaValidator, core_schema

from devkit.schemas import render, schema_of
from service.core.compiled_contract import NOT_CONTROL, NOT_SPACE_OR_CONTROL
from service.core.contract import ChangeEvent
from service.core.control_chars import (
    ADDED_AFTER_UNICODE_14,
    CONTROL_RANGES,
    CONTROL_RE,
    SCHEMA_CLASS,
    describe,
    first_control,
    is_control,
)

# Surrogates cannot be in UTF-8, so never in a decoded JSON string.
CODE_POINTS = [cp for cp in range(sys.maxunicode + 1) if not 0xD800 <= cp <= 0xDFFF]
EVERY_CHARACTER = "".join(map(chr, CODE_POINTS))
REFUSED = {cp for cp in CODE_POINTS if is_control(cp)}


def python_cc_cf() -> set[int]:
    return {cp for cp in CODE_POINTS if unicodedata.category(chr(cp)) in ("Cc", "Cf")}


def rust_matches(pattern: str) -> set[int]:
    """The code points a pydantic-core (Rust regex crate) pattern accepts alone."""
    matches = SchemaValidator(core_schema.str_schema(pattern=f"^{pattern}$"))
    accepted = set()
    for cp in CODE_POINTS:
        try:
            matches.validate_python(chr(cp))
        except ValidationError:
            continue
        accepted.add(cp)
    return accepted


def test_every_cc_and_cf_code_point_of_this_python_is_refused() -> None:
    known = python_cc_cf()
    assert known <= REFUSED
    # What the set adds beyond this Python's database: Cf code points of a later Unicode,
    # unassigned here (Python 3.11 is Unicode 14.0: U+13439..U+1343F, Unicode 15.0).
    added = REFUSED - known
    assert all(unicodedata.category(chr(cp)) == "Cn" for cp in added)
    assert added <= set(ADDED_AFTER_UNICODE_14)
    if unicodedata.unidata_version == "14.0.0":
        assert sorted(added) == list(ADDED_AFTER_UNICODE_14)


def test_every_cc_and_cf_code_point_of_pydantic_cores_regex_crate_is_refused() -> None:
    # Its tables are newer than Python's: should an upgrade call more code points Cc or
    # Cf, the set is updated here first.
    assert rust_matches(r"[\p{Cc}\p{Cf}]") <= REFUSED


def test_the_ranges_are_ordered_and_disjoint() -> None:
    ends = [end for pair in CONTROL_RANGES for end in pair]
    assert ends == sorted(ends)
    assert all(low <= high for low, high in CONTROL_RANGES)
    assert all(a[1] + 1 < b[0] for a, b in itertools.pairwise(CONTROL_RANGES))


def test_the_validators_regex_is_the_set() -> None:
    assert {ord(found.group()) for found in CONTROL_RE.finditer(EVERY_CHARACTER)} == REFUSED


def test_the_compiled_contracts_rust_classes_are_the_set() -> None:
    assert rust_matches(NOT_CONTROL) == set(CODE_POINTS) - REFUSED
    refused_or_space = REFUSED | {cp for cp in CODE_POINTS if chr(cp).isspace()}
    assert rust_matches(NOT_SPACE_OR_CONTROL) == set(CODE_POINTS) - refused_or_space


def test_the_json_schema_pattern_is_the_set_in_python_re_and_ecma_262() -> None:
    schema = schema_of(ChangeEvent)
    pattern = schema["$defs"]["control_character"]["pattern"]
    assert pattern == SCHEMA_CLASS
    # Python's re, which the jsonschema library searches patterns with (as the example
    # tests use it; one code point at a time through it would take seconds):
    assert {ord(found.group()) for found in re.finditer(pattern, EVERY_CHARACTER)} == REFUSED
    rule = Draft202012Validator({"type": "string", "pattern": pattern})
    assert [rule.is_valid(text) for text in ("a\nb", "a\u200bb", "Zürich 東京", "a")] == [
        True,
        True,
        False,
        False,
    ]
    # ECMA-262 in Unicode mode (regress, an ECMAScript regex engine):
    data = EVERY_CHARACTER.encode()
    found = regress.Regex(pattern, "u").find_iter(EVERY_CHARACTER) or ()
    assert {ord(data[match.range()].decode()) for match in found} == REFUSED
    # ... and it compiles without the u flag: no range above U+FFFF, whose UTF-16 halves
    # would make an out-of-order range there.
    regress.Regex(pattern)
    assert all(high <= 0xFFFF or low == high for low, high in _ranges_of(pattern))


def _ranges_of(pattern: str) -> list[tuple[int, int]]:
    body = pattern[1:-1]
    ranges, index = [], 0
    while index < len(body):
        if index + 2 < len(body) and body[index + 1] == "-":
            ranges.append((ord(body[index]), ord(body[index + 2])))
            index += 3
        else:
            ranges.append((ord(body[index]), ord(body[index])))
            index += 1
    return ranges


def test_the_schema_file_shows_no_invisible_character() -> None:
    text = render(ChangeEvent)
    assert first_control(text.replace("\n", "")) is None
    assert json.loads(text) == schema_of(ChangeEvent)


def test_first_control_and_describe() -> None:
    assert first_control("Zürich 東京 Привет مرحبا") is None
    assert first_control("ab\u202ec") == 2
    assert describe("\u202e") == "the format character U+202E RIGHT-TO-LEFT OVERRIDE"
    assert describe("\x00") == "the control character U+0000"
    assert describe("\U0001343a").startswith("the format character U+1343A")
