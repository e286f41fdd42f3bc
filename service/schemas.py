"""JSON Schemas of the records scm-relay reads and writes, generated from the models.

`python -m service.schemas write DIR` regenerates the files in `schemas/`
(`make schemas`); `check DIR` exits 1 when the committed files have drifted
from the models. The schemas use the default contract limits.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

from pydantic import BaseModel

from service.core.contract import ChangeEvent
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


def schema_of(model: type[BaseModel]) -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of the JSON a model accepts."""
    return {"$schema": JSON_SCHEMA_DIALECT, **model.model_json_schema(mode="validation")}


def render(model: type[BaseModel]) -> str:
    """The schema file text: stable key order, two-space indent, final newline."""
    return json.dumps(schema_of(model), indent=2, ensure_ascii=False) + "\n"


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
        print("usage: python -m service.schemas write|check DIR", file=sys.stderr)
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
