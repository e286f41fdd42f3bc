"""A deterministic event loop on a virtual clock, where each replica can be paused or
killed between any two of its steps.

Nothing in a simulation does real I/O, so the loop never waits: when no callback is
ready, its clock jumps to the next timer. Every callback is gated by the replica it
belongs to (the `REPLICA` context variable of the task or timer that scheduled it):
a paused replica's callbacks are set aside until it resumes, while the clock runs on
for everyone else; a killed replica's are dropped and never run again, as after a
SIGKILL (no `finally`, no cleanup; they are only kept, never run, so that the tasks can be
wound down once the history is over). Callbacks run in the order they were scheduled,
timers in the order of their times (ties: scheduling order), so a seed gives one
history.
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import selectors
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any, Final

# Which replica a task or timer belongs to; None: the broker, the API, the harness.
REPLICA: Final[contextvars.ContextVar[str | None]] = contextvars.ContextVar(
    "sim_replica", default=None
)


# Callbacks in a row without the virtual clock moving, beyond which the world is stuck
# in a busy loop (a real relay would burn a core there).
BUSY_LIMIT: Final = 2_000_000


class SimulationStalledError(RuntimeError):
    """Nothing is ready and no timer is set: the simulated world can no longer move."""


class _NoIOSelector(selectors.BaseSelector):
    """A selector with nothing to wait for: each `select` advances the virtual clock by
    its timeout (the time to the next timer)."""

    def __init__(self, loop: VirtualLoop) -> None:
        self._loop = loop
        self._keys: dict[Any, selectors.SelectorKey] = {}

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        key = selectors.SelectorKey(fileobj, _fd(fileobj), events, data)
        self._keys[fileobj] = key
        return key

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        return self._keys.pop(fileobj)

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if timeout is None:
            raise SimulationStalledError("no callback ready and no timer set")
        if timeout > 0:
            self._loop.advance(timeout)
        return []

    def get_map(self) -> Mapping[Any, selectors.SelectorKey]:
        return self._keys

    def close(self) -> None:
        self._keys.clear()


def _fd(fileobj: Any) -> int:
    return fileobj if isinstance(fileobj, int) else int(fileobj.fileno())


class _NumberedTask(asyncio.Task):  # type: ignore[type-arg]
    """A task hashed by its creation number, not its memory address: asyncio keeps tasks in
    sets (a TaskGroup cancels its children in set order), whose iteration order would
    otherwise follow where the allocator put them, from one run to the next."""

    _numbers = itertools.count()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._number = next(_NumberedTask._numbers)  # before: creating it hashes it
        super().__init__(*args, **kwargs)

    def __hash__(self) -> int:
        return self._number

    def __eq__(self, other: object) -> bool:
        return self is other


class VirtualLoop(asyncio.SelectorEventLoop):
    """The simulation's event loop (see the module's docstring)."""

    def __init__(self) -> None:
        self._now = 0.0
        self.paused: set[str] = set()
        self.killed: set[str] = set()
        self._set_aside: dict[str, list[tuple[Any, Callable[..., Any], tuple[Any, ...], Any]]] = {}
        self.steps: Counter[str] = Counter()
        # Called before a replica's step number N runs: (replica, N) -> action.
        self.at_step: dict[tuple[str, int], Callable[[], None]] = {}
        self._still = 0
        self.stalled: str | None = None
        super().__init__(_NoIOSelector(self))
        _NumberedTask._numbers = itertools.count()  # numbered from 0 in every history
        self.set_task_factory(self._task)

    def _task(self, loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> asyncio.Task[Any]:
        return _NumberedTask(coro, loop=loop, **kwargs)

    def time(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        """Move the virtual clock on (only the selector does, when nothing is ready)."""
        self._now += seconds
        self._still = 0

    # Each callback is wrapped in `_gate`, with a holder of its own handle: a callback set
    # aside while its replica is paused must not run if its handle is cancelled meanwhile
    # (an `asyncio.timeout` left before its timer's turn came, for one).

    def call_soon(  # type: ignore[override]
        self, callback: Callable[..., Any], *args: Any, context: contextvars.Context | None = None
    ) -> asyncio.Handle:
        ctx = context if context is not None else contextvars.copy_context()
        holder: list[asyncio.Handle] = []
        handle = super().call_soon(self._gate, holder, callback, args, ctx, context=ctx)
        holder.append(handle)
        return handle

    def call_at(  # type: ignore[override]
        self,
        when: float,
        callback: Callable[..., Any],
        *args: Any,
        context: contextvars.Context | None = None,
    ) -> asyncio.TimerHandle:
        ctx = context if context is not None else contextvars.copy_context()
        holder: list[asyncio.Handle] = []
        handle = super().call_at(when, self._gate, holder, callback, args, ctx, context=ctx)
        holder.append(handle)
        return handle

    def _gate(
        self,
        holder: list[asyncio.Handle],
        callback: Callable[..., Any],
        args: tuple[Any, ...],
        ctx: Any,
    ) -> None:
        if holder and holder[0].cancelled():
            return
        if holder and isinstance(holder[0], asyncio.TimerHandle) and holder[0].when() > self._now:
            # asyncio runs a timer up to its clock resolution early, by when a real clock
            # has reached it; a virtual one must too, or code that waits for a deadline
            # wakes a hair before it, again and again, for ever.
            self._now = holder[0].when()
            self._still = 0
        self._still += 1
        if self._still > BUSY_LIMIT:
            if self.stalled is None:
                self.stalled = (
                    f"{BUSY_LIMIT} callbacks at t={self._now:.3f} without the clock moving: a "
                    f"busy loop (in {callback!r})"
                )
                self.stop()
            return
        replica = REPLICA.get()
        if replica is not None:
            if replica in self.paused or replica in self.killed:
                self._set_aside.setdefault(replica, []).append((holder, callback, args, ctx))
                return
            self.steps[replica] += 1
            action = self.at_step.pop((replica, self.steps[replica]), None)
            if action is not None:
                action()
                if replica in self.paused or replica in self.killed:
                    self._set_aside.setdefault(replica, []).append((holder, callback, args, ctx))
                    return
        callback(*args)

    def pause(self, replica: str) -> None:
        """From now on, `replica`'s callbacks wait (its clock-driven timers too)."""
        self.paused.add(replica)

    def resume(self, replica: str) -> None:
        """Run what `replica` set aside, in order, then go on as before."""
        self.paused.discard(replica)
        for holder, callback, args, ctx in self._set_aside.pop(replica, []):
            super().call_soon(self._gate, holder, callback, args, ctx, context=ctx)

    def kill(self, replica: str) -> None:
        """`replica` runs no code ever again (its memory is gone). Its callbacks are kept
        aside, never run, only so that `wind_down` can end its tasks cleanly."""
        self.killed.add(replica)
        self.paused.discard(replica)

    def wind_down(self) -> None:
        """After the history: every replica runs again (killed ones too), so that their
        tasks can be cancelled and end before the loop closes."""
        self.killed.clear()
        self.paused.clear()
        self._still = 0  # after a busy loop stopped the history, the tasks still end
        for replica in list(self._set_aside):
            self.resume(replica)
