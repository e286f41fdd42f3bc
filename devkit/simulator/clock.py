"""The simulator's wall clock, written as the API writes times."""

from __future__ import annotations

from datetime import UTC, datetime


def now_iso() -> str:
    """The current time as the API writes it."""
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")
