"""The committed JSON Schemas are exactly what the models generate."""

from __future__ import annotations

from pathlib import Path

import pytest
from jsonschema import Draft202012Validator

from devkit.schemas import SCHEMA_FILES, drifted, main, render, schema_of

SCHEMAS = Path(__file__).resolve().parents[2] / "schemas"


def test_committed_schemas_match_the_models() -> None:
    assert drifted(SCHEMAS) == [], "schemas/ drifted from the models: run `make schemas`"


@pytest.mark.parametrize("name", sorted(SCHEMA_FILES))
def test_each_schema_is_a_valid_draft_2020_12_schema(name: str) -> None:
    Draft202012Validator.check_schema(schema_of(SCHEMA_FILES[name]))


def test_check_reports_a_drifted_file(tmp_path: Path) -> None:
    assert main(["write", str(tmp_path)]) == 0
    assert main(["check", str(tmp_path)]) == 0
    name = next(iter(SCHEMA_FILES))
    (tmp_path / name).write_text(render(SCHEMA_FILES[name]).replace("constraints", "constraint"))
    assert drifted(tmp_path) == [name]
    assert main(["check", str(tmp_path)]) == 1
