"""Strings from data made harmless to the terminal that shows them.

An event's field, a dead letter's message, a task's reference or an API answer can
hold anything: an ESC or OSC sequence that rewrites the operator's screen or sets its
window title, a hyperlink, a right-to-left override that shows a code backwards, a
zero-width character that makes two different values look alike. The tools print
such characters as visible escapes (`\\x1b`, `\\u202e`) in tables and prose, and as
JSON escapes in `--json` documents, whose data stays exact.
"""

from __future__ import annotations

import json
import re
from typing import Any, Final

from service.core.control_chars import CONTROL_RE

# The contract's control and format characters (C0, DEL, C1, bidirectional controls,
# zero-width characters, tags...), and the line and paragraph separators some
# terminals break lines at.
UNSAFE: Final = re.compile(f"{CONTROL_RE.pattern}|[\u2028\u2029]")
# Cells longer than this are cut in tables (rich would measure and fold every
# character of a megabyte value); --json has them whole.
MAX_CELL_CHARS: Final = 500


def visible_escape(char: str) -> str:
    """`\\x1b`, `\\u202e` or `\\U000e0001`: the character's code point, in Python's form."""
    code_point = ord(char)
    if code_point <= 0xFF:
        return f"\\x{code_point:02x}"
    if code_point <= 0xFFFF:
        return f"\\u{code_point:04x}"
    return f"\\U{code_point:08x}"


def printable(text: str, *, keep_newlines: bool = False) -> str:
    """`text` with every unsafe character shown as its escape (line feeds kept when
    asked: inside a table cell they stay inside the cell)."""

    def escape(found: re.Match[str]) -> str:
        char = found.group()
        return char if keep_newlines and char == "\n" else visible_escape(char)

    return UNSAFE.sub(escape, text)


def cut(text: str, limit: int = MAX_CELL_CHARS) -> str:
    """`text`, or its first `limit` characters and how many more there are."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… (+{len(text) - limit} characters; --json shows all)"


def _json_escape(found: re.Match[str]) -> str:
    code_point = ord(found.group())
    if code_point <= 0xFFFF:
        return f"\\u{code_point:04x}"
    # JSON escapes a character beyond the Basic Multilingual Plane as a UTF-16 pair.
    high, low = divmod(code_point - 0x10000, 0x400)
    return f"\\u{0xD800 + high:04x}\\u{0xDC00 + low:04x}"


def json_text(document: Any) -> str:
    """`document` as JSON (non-ASCII letters as they are) with every unsafe character
    as a JSON escape: the same data for a parser, nothing raw for a terminal. json.dumps
    escapes C0 controls itself but writes DEL, C1 and format characters raw; outside
    strings JSON has only ASCII punctuation, so each one found is inside a string."""
    return UNSAFE.sub(_json_escape, json.dumps(document, ensure_ascii=False, default=str))
