"""The tools' printer with hostile strings but no markup: control and format characters
never reach the stream raw, in tables, prose lines or JSON, and JSON keeps the data."""

from __future__ import annotations

import io
import json
import re

from service.tools.output import Printer

# From the terminals' rules, not from the code under test.
FORBIDDEN = re.compile(
    "[\x00-\x09\x0b-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2028\u2029\u2066-\u2069\ufeff]"
)
HOSTILE = {
    "osc": "title\x1b]0;owned\x07",
    "csi": "wipe\x1b[2J",
    "c1": "c1\x9b31m\x9d0;t\x9c",
    "bidi": "abc\u202edcba",
    "zero_width": "a\u200bb\ufeffc",
    "separator": "a\u2028b",
    "tag": "tag\U000e0041",
    "secret": "has tok-out-secret in it",
}


def printed(as_json: bool, action: str) -> str:
    stream = io.StringIO()
    printer = Printer(as_json=as_json, secrets=["tok-out-secret"], stream=stream)
    if action == "table":
        rows = [{"name": name, "value": value} for name, value in HOSTILE.items()]
        printer.table("t", ["name", "value"], [*rows, {"name": "nested", "value": HOSTILE}])
    elif action == "line":
        printer.line(" ".join(HOSTILE.values()))
    else:
        printer.json(HOSTILE)
    return stream.getvalue()


def test_a_table_and_a_line_show_escapes_not_raw_characters() -> None:
    for action in ("table", "line"):
        out = printed(False, action)
        assert FORBIDDEN.search(out) is None, repr(out)
        assert "tok-out-secret" not in out
        for shown in ("\\x1b]0;owned\\x07", "\\x9b31m", "abc\\u202edcba", "\\U000e0041"):
            assert shown in out, (action, out)


def test_json_is_the_exact_data_with_nothing_raw() -> None:
    out = printed(True, "json")
    assert FORBIDDEN.search(out) is None, repr(out)
    assert json.loads(out) == {**HOSTILE, "secret": "has [redacted] in it"}
    # Letters of any script stay as they are.
    stream = io.StringIO()
    Printer(as_json=True, stream=stream).json({"market": "Österreich 日本"})
    assert "Österreich 日本" in stream.getvalue()
