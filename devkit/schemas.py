"""JSON Schemas of the records scm-relay reads and writes, generated from the models.

`python -m devkit.schemas write DIR` regenerates the files in `schemas/`
(`make schemas`); `check DIR` exits 1 when the committed files have drifted
from the models. The schemas use the default contract limits.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

from pydantic import BaseModel

from service.core.contract import CONTROL_CHARACTER_SCHEMA, ChangeEvent
from service.core.control_chars import CONTROL_RE, UNICODE_VERSION
from service.core.records import (
    IntentClosure,
    IntentRecord,
    TaskLedgerRecord,
    TaskOutcome,
    TaskProgress,
)

JSON_SCHEMA_DIALECT: Final = "https://json-schema.org/draft/2020-12/schema"
SCHEMA_FILES: Final[dict[str, type[BaseModel]]] = {
    "scm-change-event.schema.json": ChangeEvent,
    "scm-task-result.schema.json": TaskOutcome,
    "scm-task-ledger.schema.json": TaskLedgerRecord,
    "scm-task-progress.schema.json": TaskProgress,
    "scm-ledger-intent.schema.json": IntentRecord,
    "scm-ledger-intent-closed.schema.json": IntentClosure,
}


# The rule "holds a control or format character", which every string of a change event
# must not match: written once, referred to from each string.
_CONTROL_CHARACTER_DEF: Final = "control_character"


def schema_of(model: type[BaseModel]) -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of the JSON a model accepts."""
    generated = model.model_json_schema(mode="validation")
    schema = _shared(generated)
    if schema != generated:
        schema["$defs"] = {
            **schema.get("$defs", {}),
            _CONTROL_CHARACTER_DEF: {
                **CONTROL_CHARACTER_SCHEMA,
                "description": (
                    "A string holding a control or format character (Unicode Cc, Cf; the "
                    f"set of Unicode {UNICODE_VERSION}), which no string of an event may hold."
                ),
                "$comment": (
                    "The characters themselves (shown as \\u escapes): Python's re and "
                    "ECMA-262 with the u flag read them as code points. Those above U+FFFF "
                    "are listed one by one, never as a range, so that ECMA-262 without the "
                    "u flag still compiles the pattern (it then also refuses the characters "
                    "that share a UTF-16 high surrogate with one)."
                ),
            },
        }
    return {"$schema": JSON_SCHEMA_DIALECT, **schema}


def _shared(node: Any) -> Any:
    """`node` with each copy of the control-character rule replaced by a reference."""
    if node == CONTROL_CHARACTER_SCHEMA:
        return {"$ref": f"#/$defs/{_CONTROL_CHARACTER_DEF}"}
    if isinstance(node, dict):
        return {key: _shared(value) for key, value in node.items()}
    if isinstance(node, list):
        return [_shared(value) for value in node]
    return node


def render(model: type[BaseModel]) -> str:
    """The schema file text: stable key order, two-space indent, final newline."""
    text = json.dumps(schema_of(model), indent=2, ensure_ascii=False) + "\n"
    # The patterns that refuse control and format characters hold them: written as \u
    # escapes (surrogate pairs above U+FFFF), never as invisible characters in the file.
    # json.dumps already escapes those below U+0020 inside strings; outside strings they
    # are the file's own line breaks.
    return CONTROL_RE.sub(_escaped, text)


def _escaped(found: re.Match[str]) -> str:
    char = found.group()
    return char if char < " " else json.dumps(char)[1:-1]


def drifted(directory: Path) -> list[str]:
    """Names of schema files in `directory` that differ from what the models generate."""
    stale = []
    for name, model in SCHEMA_FILES.items():
        path = directory / name
        if not path.is_file() or path.read_text(encoding="utf-8") != render(model):
            stale.append(name)
    return stale


def main(argv: Sequence[str] | None = None) -> int:
    """`write DIR` or `check DIR`."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2 or args[0] not in ("write", "check"):
        print("usage: python -m devkit.schemas write|check DIR", file=sys.stderr)
        return 2
    command, directory = args[0], Path(args[1])
    if command == "write":
        directory.mkdir(parents=True, exist_ok=True)
        for name, model in SCHEMA_FILES.items():
            (directory / name).write_text(render(model), encoding="utf-8")
        return 0
    stale = drifted(directory)
    for name in stale:
        print(f"{directory / name} differs from the models: run `make schemas`", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
