"""structlog set-up, done once by the entry point (never at import time)."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, MutableMapping
from typing import Any, Final

import structlog

# Lines about one event, batch or task are never limited: each is worth its line.
IDENTITY_KEYS: Final = ("offset", "event_id", "batch_id", "task_id")


class RepeatLimiter:
    """structlog processor: a warning or error without an item identity (an outage, a
    refused token, a failed poll) is logged at most once per `window_s` for the same
    event, endpoint, status, reason and outcome; the next line that passes says how many
    were suppressed (`repeated`)."""

    def __init__(self, window_s: float = 10.0, clock: Callable[[], float] = time.monotonic):
        self.window_s = window_s
        self._clock = clock
        self._seen: dict[tuple[Any, ...], tuple[float, int]] = {}

    def __call__(
        self, logger: Any, method_name: str, event_dict: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        if method_name not in ("warning", "error") or any(k in event_dict for k in IDENTITY_KEYS):
            return event_dict
        key = tuple(
            event_dict.get(name) for name in ("event", "endpoint", "status", "reason", "outcome")
        )
        now = self._clock()
        last = self._seen.get(key)
        if last is not None and now - last[0] < self.window_s:
            self._seen[key] = (last[0], last[1] + 1)
            raise structlog.DropEvent
        if last is not None and last[1]:
            event_dict["repeated"] = last[1]
        if len(self._seen) > 1000:  # bounded: forget the quietest half
            for stale in sorted(self._seen, key=lambda k: self._seen[k][0])[:500]:
                del self._seen[stale]
        self._seen[key] = (now, 0)
        return event_dict


def configure_logging(log_format: str, level: str) -> None:
    """JSON lines (with dict tracebacks) in production, a console renderer on a TTY."""
    use_console = log_format == "console" or (log_format == "auto" and sys.stderr.isatty())
    renderer: structlog.types.Processor = (
        structlog.dev.ConsoleRenderer()
        if use_console
        else structlog.processors.JSONRenderer(sort_keys=False)
    )
    processors: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        RepeatLimiter(),
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if not use_console:
        processors.append(structlog.processors.dict_tracebacks)
    processors.append(renderer)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level)),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
