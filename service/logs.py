"""structlog set-up, done once by the entry point (never at import time).

The standard library's logging (aiokafka, asyncio, aiohttp) goes through the same
renderer and redactor as the relay's own lines, and `log_loop_exceptions` sends what
an event loop reports (an exception nobody retrieved) there too: no line reaches
stderr in another format or with a secret in it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from collections.abc import Callable, Iterable, MutableMapping
from typing import Any, Final, TextIO, cast

import structlog
from structlog.tracebacks import ExceptionDictTransformer

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


# Shorter strings are not secrets worth a search (and would redact ordinary words).
MIN_SECRET_LENGTH: Final = 4
REDACTED: Final = "[redacted]"


class Redactor:
    """The last step before a line is written: every secret the settings hold, in any
    form it may take in a rendered line (as is, JSON- or repr-escaped), is replaced.

    Defence in depth: tracebacks carry no local variables (where aiohttp keeps the
    Authorization header) and secrets are `SecretStr`, but an exception message or a
    library's repr could still quote one."""

    def __init__(self, renderer: Callable[..., Any], secrets: Iterable[str]) -> None:
        self._renderer = renderer
        self._forms: list[str] = []
        for secret in secrets:
            self.add(secret)

    def add(self, secret: str) -> None:
        """Redact `secret` too."""
        if len(secret) < MIN_SECRET_LENGTH:
            return
        forms = {*self._forms, secret, repr(secret)[1:-1], json.dumps(secret)[1:-1]}
        # Longest first, so a form containing another is replaced whole.
        self._forms = sorted(forms, key=len, reverse=True)

    def redact(self, text: str) -> str:
        for form in self._forms:
            text = text.replace(form, REDACTED)
        return text

    def __call__(self, logger: Any, method_name: str, event_dict: MutableMapping[str, Any]) -> Any:
        line = self._renderer(logger, method_name, event_dict)
        return self.redact(line) if isinstance(line, str) else line


_redactor: Redactor | None = None
# JSON lines carry a traceback as a dict, without local variables.
_EXCEPTION_AS_DICT: Final = structlog.processors.ExceptionRenderer(
    ExceptionDictTransformer(show_locals=False)
)


def add_secret(secret: str) -> None:
    """A secret learnt after start-up (a rotated token) is redacted from now on."""
    if _redactor is not None:
        _redactor.add(secret)


def configure_logging(log_format: str, level: str, secrets: Iterable[str] = ()) -> None:
    """JSON lines (with dict tracebacks, without local variables) in production, a
    console renderer on a TTY; `secrets` never reach the output (see `Redactor`)."""
    use_console = log_format == "console" or (log_format == "auto" and sys.stderr.isatty())
    renderer: structlog.types.Processor = (
        # plain_traceback: rich's and better-exceptions' tracebacks print local variables.
        structlog.dev.ConsoleRenderer(exception_formatter=structlog.dev.plain_traceback)
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
        processors.append(_EXCEPTION_AS_DICT)
    global _redactor
    _redactor = Redactor(renderer, secrets)
    processors.append(_redactor)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level)),
        logger_factory=structlog.PrintLoggerFactory(file=cast(TextIO, _CurrentStderr())),
        cache_logger_on_first_use=True,
    )
    _route_standard_logging(level, _redactor, use_console)


class _CurrentStderr:
    """`sys.stderr` as it is when a line is written: loggers are cached on first use,
    and a stream replaced since (the tools' tests capture it per test) must not keep
    receiving lines after it was closed."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


class _StructlogHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The handler `configure_logging` puts on the root logger (replaced, never added
    twice, when it is called again)."""


def _route_standard_logging(level: str, redactor: Redactor, use_console: bool) -> None:
    """Records of the standard library's loggers become lines like ours: the same
    fields (`logger` names the library's logger), renderer and redactor."""
    pre_chain: list[structlog.types.Processor] = [
        structlog.stdlib.add_logger_name,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if not use_console:
        pre_chain.append(_EXCEPTION_AS_DICT)
    handler = _StructlogHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=pre_chain,
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, redactor],
        )
    )
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _StructlogHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    # A library's info lines are its own business (aiokafka's group chatter); its
    # warnings and errors are ours. A tool may lower a library's own logger for DEBUG.
    root.setLevel(max(logging.WARNING, logging.getLevelName(level)))


def log_loop_exceptions(loop: asyncio.AbstractEventLoop) -> None:
    """What `loop` reports (a task's exception nobody retrieved, a failing callback) is
    logged as `event_loop_exception` through structlog, redacted like every line."""
    logger = structlog.get_logger("asyncio")

    def report(_loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exception = context.get("exception")
        fields = {
            name: repr(value)
            for name, value in context.items()
            if name not in ("message", "exception")
        }
        logger.error(
            "event_loop_exception",
            problem=context.get("message", "unhandled exception in the event loop"),
            exc_info=exception if isinstance(exception, BaseException) else None,
            **fields,
        )

    loop.set_exception_handler(report)
