"""The characters no string of a change event may hold: Unicode's control (Cc) and
format (Cf) characters, as one explicit, versioned set of code points.

A NUL, an ESC sequence, a line break, a zero-width space or a right-to-left
override inside a code or a field value is invisible where people look (logs,
the portal, a spreadsheet) and is sent to the API as it is: the relay refuses
it instead. Every other character, letters of any script included, passes
unchanged.

The set is explicit, not "whatever the local Unicode tables call Cc or Cf",
because the contract's two paths read different tables: Python 3.11's
`unicodedata` is Unicode 14.0, while the regex crate inside pydantic-core is
newer and calls U+13439..U+1343F (Egyptian hieroglyph format controls, new in
Unicode 15.0) Cf as well. `\\p{Cf}` on one path and `unicodedata.category` on
the other would disagree on those; both use these ranges instead (the compiled
contract as an explicit Rust regex class, the validators as the same ranges in
a Python regex, the JSON Schema as a pattern of the same characters).
`tests/unit/core/test_control_chars.py` holds the set to every Cc and Cf code point of
the running Python and of pydantic-core's regex crate, so an upgrade that
knows more fails there first.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Final

# Cc and Cf of Unicode 16.0 (Cf is unchanged since 15.0).
UNICODE_VERSION: Final = "16.0.0"
CONTROL_RANGES: Final[tuple[tuple[int, int], ...]] = (
    (0x0000, 0x001F),  # C0 controls: NUL, BEL, tab, line feed, carriage return, ESC...
    (0x007F, 0x009F),  # DEL and the C1 controls (NEL, CSI...)
    (0x00AD, 0x00AD),  # soft hyphen
    (0x0600, 0x0605),  # Arabic number signs
    (0x061C, 0x061C),  # Arabic letter mark
    (0x06DD, 0x06DD),  # Arabic end of ayah
    (0x070F, 0x070F),  # Syriac abbreviation mark
    (0x0890, 0x0891),  # Arabic pound and piastre marks above
    (0x08E2, 0x08E2),  # Arabic disputed end of ayah
    (0x180E, 0x180E),  # Mongolian vowel separator
    (0x200B, 0x200F),  # zero-width space, non-joiner, joiner; left-to-right, right-to-left marks
    (0x202A, 0x202E),  # bidirectional embeddings and overrides
    (0x2060, 0x2064),  # word joiner, invisible operators
    (0x2066, 0x206F),  # bidirectional isolates, deprecated format characters
    (0xFEFF, 0xFEFF),  # zero-width no-break space (a byte-order mark inside a value)
    (0xFFF9, 0xFFFB),  # interlinear annotation
    (0x110BD, 0x110BD),  # Kaithi number sign
    (0x110CD, 0x110CD),  # Kaithi number sign above
    (0x13430, 0x1343F),  # Egyptian hieroglyph format controls (..13438 before Unicode 15.0)
    (0x1BCA0, 0x1BCA3),  # shorthand format controls
    (0x1D173, 0x1D17A),  # musical symbol beams, ties, slurs, phrases
    (0xE0001, 0xE0001),  # language tag
    (0xE0020, 0xE007F),  # tag characters
)
# The code points Unicode added to Cf after 14.0 (Python 3.11's tables), in the set.
ADDED_AFTER_UNICODE_14: Final = tuple(range(0x13439, 0x13440))


def is_control(code_point: int) -> bool:
    """Whether the code point is in the refused set."""
    return any(low <= code_point <= high for low, high in CONTROL_RANGES)


def _class(items: list[str]) -> str:
    return "[" + "".join(items) + "]"


# The validators' check: the ranges as literal characters (none is special in a class).
CONTROL_RE: Final = re.compile(
    _class([chr(low) if low == high else f"{chr(low)}-{chr(high)}" for low, high in CONTROL_RANGES])
)
# The compiled contract's: the body of a Rust regex class (`[^...]` and `[...]` alike).
RUST_CLASS_BODY: Final = "".join(
    f"\\x{{{low:x}}}" if low == high else f"\\x{{{low:x}}}-\\x{{{high:x}}}"
    for low, high in CONTROL_RANGES
)
# The JSON Schema's: a class of literal characters (JSON Schema's most portable regex
# token; the schema file shows them as \u escapes). Python's `re` (the `jsonschema`
# library) and ECMA-262 in Unicode mode (the `u` flag) read it as these code points.
# Ranges above U+FFFF are listed one character at a time: ECMA-262 without the `u` flag
# sees such a character as two UTF-16 halves, where a range would be out of order and
# the whole pattern a syntax error; one character at a time it stays valid there (and
# over-broad: it also refuses the characters that share a high surrogate with one).
SCHEMA_CLASS: Final = _class(
    [
        chr(low) if low == high else f"{chr(low)}-{chr(high)}"
        for low, high in CONTROL_RANGES
        if high <= 0xFFFF
    ]
    + [chr(cp) for low, high in CONTROL_RANGES if high > 0xFFFF for cp in range(low, high + 1)]
)


def first_control(text: str) -> int | None:
    """The index of the first refused character in `text`, or None."""
    found = CONTROL_RE.search(text)
    return None if found is None else found.start()


def describe(char: str) -> str:
    """A refused character for a message: its code point and, when known, its name."""
    code_point = ord(char)
    kind = "control" if code_point <= 0x9F else "format"
    name = unicodedata.name(char, "")
    return f"the {kind} character U+{code_point:04X}" + (f" {name}" if name else "")
