"""`scm-relay validate`: judge JSON-lines change events offline, one verdict per line.

Lines are read one at a time with a bound of `max_record_bytes`, so a file of
any length (or a single enormous line) is checked in bounded memory.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import BinaryIO, Final, TextIO

from service.core.contract_limits import ContractLimits
from service.core.parsing import ParsedEvent, parse_event
from service.core.reasons import Reason, Rejection
from service.tools.terminal import json_text

_READ_CHUNK: Final = 1 << 16


@dataclass
class ValidationSummary:
    """Counts over one validated stream."""

    valid: int = 0
    with_warnings: int = 0
    invalid: int = 0
    reasons: Counter[str] = field(default_factory=Counter)

    @property
    def total(self) -> int:
        """Lines judged (blank lines are not events and are not counted)."""
        return self.valid + self.invalid

    def describe(self) -> str:
        """The one-line summary printed to stderr."""
        text = (
            f"{self.total} events: {self.valid} valid ({self.with_warnings} with warnings), "
            f"{self.invalid} invalid"
        )
        if self.reasons:
            top = ", ".join(f"{reason} {count}" for reason, count in self.reasons.most_common(5))
            text += f" ({top})"
        return text


def read_line(stream: BinaryIO, limit: int) -> tuple[bytes, bool] | None:
    """The next line without its line ending, and whether it was over `limit` bytes.

    An over-long line is read to its end in chunks and dropped, never held whole.
    """
    line = stream.readline(limit + 1)
    if not line:
        return None
    if line.endswith(b"\n") or len(line) <= limit:
        return line.rstrip(b"\r\n"), False
    while True:
        rest = stream.readline(_READ_CHUNK)
        if not rest or rest.endswith(b"\n"):
            return b"", True


def verdict(line_number: int, result: ParsedEvent | Rejection) -> dict[str, object]:
    """The JSON verdict of one line."""
    if isinstance(result, ParsedEvent):
        ok: dict[str, object] = {"line": line_number, "ok": True}
        if result.warnings:
            ok["warnings"] = list(result.warnings)
        return ok
    return {
        "line": line_number,
        "ok": False,
        "stage": result.stage.value,
        "reason": result.reason.value,
        "message": result.message,
        "field": result.field,
    }


def validate_stream(source: BinaryIO, out: TextIO, limits: ContractLimits) -> ValidationSummary:
    """Write one verdict per non-blank line of `source` to `out`; return the counts."""
    summary = ValidationSummary()
    line_number = 0
    while (read := read_line(source, limits.max_record_bytes)) is not None:
        line_number += 1
        raw, too_long = read
        result: ParsedEvent | Rejection
        if too_long:
            result = Rejection(
                Reason.RECORD_TOO_LARGE,
                f"the line is longer than the limit of {limits.max_record_bytes} bytes",
            )
        elif not raw.strip():
            continue
        else:
            result = parse_event(raw, limits)
        if isinstance(result, ParsedEvent):
            summary.valid += 1
            summary.with_warnings += bool(result.warnings)
        else:
            summary.invalid += 1
            summary.reasons[result.reason.value] += 1
        out.write(json_text(verdict(line_number, result)))
        out.write("\n")
    return summary
