"""SIGTERM and SIGINT remembered from the first moment of `scm-relay run`.

A SIGTERM while the relay's modules load (a second or more on a busy node, when a
rolling update or an autoscaler stops a pod that just started) would end it by the
signal's default action, exit -15: the fault suite saw three of five SIGTERMs do so
when the handlers were installed only once the CLI's own modules had loaded. The
entry point captures both signals before importing anything else; `scm-relay run`
honours what came (a clean stop, exit 0) once the relay's own handlers are in place,
and puts the previous handlers back when it returns. Standard library only: this
module is imported before everything else.
"""

from __future__ import annotations

import signal
from collections.abc import Sequence
from types import FrameType
from typing import Any

SIGNALS = (signal.SIGTERM, signal.SIGINT)

_signalled: list[int] = []
_previous: dict[int, Any] = {}


def _remember(received: int, _frame: FrameType | None) -> None:
    _signalled.append(received)


def capture_for(argv: Sequence[str]) -> None:
    """Capture the signals when `argv` (without the program name) runs the relay;
    other commands keep the default actions."""
    if list(argv[:1]) == ["run"]:
        capture()


def capture() -> list[int]:
    """Remember SIGTERM and SIGINT from now (idempotent); the list of those received."""
    if not _previous:
        _signalled.clear()
        for signum in SIGNALS:
            _previous[signum] = signal.signal(signum, _remember)
    return _signalled


def release() -> None:
    """Put back the handlers found by `capture`."""
    while _previous:
        signum, handler = _previous.popitem()
        signal.signal(signum, handler)
