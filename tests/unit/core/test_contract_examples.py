"""schemas/examples: the model and a standard JSON Schema validator agree on every file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from devkit.schemas import schema_of
from service.core.contract import ChangeEvent
from service.core.contract_limits import ContractLimits
from service.core.parsing import ParsedEvent, parse_event
from service.core.reasons import Reason, Rejection

EXAMPLES = Path(__file__).resolve().parents[3] / "schemas" / "examples"
VALID = sorted((EXAMPLES / "valid").glob("*.json"))
INVALID = sorted(p for p in (EXAMPLES / "invalid").glob("*.json") if ".limits." not in p.name)
VALIDATOR = Draft202012Validator(schema_of(ChangeEvent))


def expected_reason(path: Path) -> Reason:
    return Reason(path.stem.split("--")[0])


def limits_for(path: Path) -> ContractLimits | None:
    sidecar = path.with_name(f"{path.stem}.limits.json")
    if not sidecar.exists():
        return None
    return ContractLimits(**json.loads(sidecar.read_text()))


def schema_accepts(raw: bytes) -> bool:
    try:
        document: Any = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return False
    return VALIDATOR.is_valid(document)


@pytest.mark.parametrize("path", VALID, ids=[p.name for p in VALID])
def test_valid_example(path: Path) -> None:
    raw = path.read_bytes()
    assert isinstance(parse_event(raw), ParsedEvent), parse_event(raw)
    errors = [e.message for e in VALIDATOR.iter_errors(json.loads(raw))]
    assert errors == []


@pytest.mark.parametrize("path", INVALID, ids=[p.name for p in INVALID])
def test_invalid_example(path: Path) -> None:
    raw = path.read_bytes()
    limits = limits_for(path)
    result = parse_event(raw) if limits is None else parse_event(raw, limits)
    assert isinstance(result, Rejection), f"{path.name} was accepted"
    assert result.reason is expected_reason(path), result
    if limits is None:
        # A JSON Schema sees the document a parser made: a duplicate key is gone by then.
        if result.reason is not Reason.DUPLICATE_KEY:
            assert not schema_accepts(raw), f"the JSON Schema accepts {path.name}"
    else:
        # Schemas carry the default limits only; within those the example is fine.
        assert isinstance(parse_event(raw), ParsedEvent)


def test_every_reason_has_an_invalid_example() -> None:
    covered = {expected_reason(path) for path in INVALID}
    assert set(Reason) - covered == {Reason.API_REJECTED}


def test_there_are_valid_examples_with_and_without_warnings() -> None:
    results = [parse_event(p.read_bytes()) for p in VALID]
    parsed = [r for r in results if isinstance(r, ParsedEvent)]
    assert any(r.warnings for r in parsed)
    assert any(not r.warnings for r in parsed)


def test_docs_list_every_reason_code() -> None:
    docs = (EXAMPLES.parents[1] / "docs" / "event-contract.md").read_text()
    missing = [reason.value for reason in Reason if f"| `{reason.value}` |" not in docs]
    assert missing == []
