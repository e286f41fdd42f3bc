"""An in-memory Scantrust SCM API, written from the vendor's documentation
(docs/scantrust-scm-api.md), and the adapter that lets the relay call it.

`VendorApi` is the vendor: tasks created asynchronously and run later (pending,
in-progress, complete), each applying its scm_data to every code its constraints
match (several keys: the union, as the simulator assumes), `codes_affected`, the
task list by reference with a lag before a new task shows (an assumption: the vendor
says nothing of read-after-write), and the documented 10 uploads/s throttle counted
at arrival. Faults drawn from the seed: an answer lost after the task was created,
a 5xx before or after creating, no answer before the client's timeout (with or
without a task), a 429. Its `applied` log is what the oracle judges.

`SimApiClient` stands where the relay's `ScantrustClient` stands, for one replica:
it turns each call into a request that travels to the vendor and back (the
network belongs to nobody: a replica paused while its request is on the wire does
not hold the request back), with the client's own rule (`send_window_closed`) that an
upload is not sent once its intent's send window has closed: `send_by` on the
replica's wall clock, `deadline` on the event loop's clock, and not when the two
disagree.
"""

from __future__ import annotations

import asyncio
import contextvars
import random
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from service.core.resilience import BreakerState
from service.scantrust.client import UploadRequest, send_window_closed
from service.scantrust.outcomes import (
    Accepted,
    Ambiguous,
    ApiTask,
    Expired,
    Failure,
    TaskPage,
    Throttled,
    Unavailable,
    UploadOutcome,
)
from sim.vloop import REPLICA

EPOCH: Final = datetime(2026, 11, 27, 6, 0, tzinfo=UTC)
UPLOADS_PER_S: Final = 10


@dataclass
class Code:
    """One code of the account and what was written to it, field by field."""

    extended_id: str
    rfid: str
    fields: dict[str, str] = field(default_factory=dict)


@dataclass
class Task:
    id: str
    reference: str
    constraints: dict[str, list[str]]
    scm_data: dict[str, str]
    campaign: int | None
    created: float
    visible_from: float
    state: str = "pending"
    started: float | None = None
    completed: float | None = None
    codes_affected: int | None = None

    def view(self, *, details: bool) -> ApiTask:
        body: dict[str, Any] = {
            "id": self.id,
            "state": self.state,
            "reference": self.reference,
            "codes_affected": self.codes_affected,
            "created_by": 1638,
            "created_at": _at(self.created),
            "started_at": _at(self.started),
            "completed_at": _at(self.completed),
        }
        if details:
            # The vendor's example shows one value as a scalar.
            body["details"] = {
                "constraints": {
                    key: values[0] if len(values) == 1 else list(values)
                    for key, values in self.constraints.items()
                },
                "scm_data": dict(self.scm_data),
            }
        return ApiTask.model_validate(body)


def _at(moment: float | None) -> datetime | None:
    return None if moment is None else EPOCH + timedelta(seconds=moment)


@dataclass(frozen=True)
class Applied:
    """One task applied to the account: what the oracle reads."""

    task_id: str
    at: float
    reference: str
    constraints: dict[str, list[str]]
    scm_data: dict[str, str]
    codes: tuple[str, ...]  # extended ids of the codes it changed, in account order


@dataclass
class ApiFaults:
    """Chances per upload, drawn from the seed (all 0: a healthy API)."""

    lost_after_create: float = 0.0  # the task exists, the answer never comes back
    error_after_create: float = 0.0  # a gateway 502 after the task was created
    error_before_create: float = 0.0  # a 503 before anything was created
    timeout_before_create: float = 0.0  # no answer; nothing was created
    slow_after_create: float = 0.0  # created, but answered after the client's timeout
    read_unavailable: float = 0.0  # a read (status, list, task) fails this time
    list_lag_s: float = 1.0  # how long a new task may take to show in lists (max)
    latency_s: tuple[float, float] = (0.005, 0.05)  # one way
    pending_s: tuple[float, float] = (0.05, 2.0)
    running_s: tuple[float, float] = (0.05, 3.0)


class VendorApi:
    """The vendor's side: the account's codes, tasks and throttle."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        rng: random.Random,
        codes: Sequence[tuple[str, str]],
        faults: ApiFaults,
    ) -> None:
        self._loop = loop
        self._rng = rng
        self.faults = faults
        self.codes = [Code(extended_id, rfid) for extended_id, rfid in codes]
        self._index: dict[str, dict[str, list[int]]] = {"extended_id": {}, "rfid": {}}
        for position, code in enumerate(self.codes):
            self._index["extended_id"].setdefault(code.extended_id, []).append(position)
            self._index["rfid"].setdefault(code.rfid, []).append(position)
        self.tasks: dict[str, Task] = {}
        self.applied: list[Applied] = []
        self.log: list[str] = []
        self._arrivals: list[float] = []  # allowed uploads, for the throttle
        self._ctx = contextvars.copy_context()
        self._ctx.run(REPLICA.set, None)

    def heal(self) -> None:
        """No more faults from now on (latency and the list's lag stay)."""
        self.faults = ApiFaults(
            list_lag_s=self.faults.list_lag_s,
            latency_s=self.faults.latency_s,
            pending_s=self.faults.pending_s,
            running_s=self.faults.running_s,
        )

    def spawn(self, work: Any) -> None:
        """Run server-side work that belongs to no replica."""
        self._loop.create_task(work, context=self._ctx)

    def latency(self) -> float:
        low, high = self.faults.latency_s
        return self._rng.uniform(low, high)

    def throttled(self) -> float | None:
        """Django REST framework's SimpleRateThrottle for the scm_update scope: the wait
        when an eleventh upload arrives within one second, else None (and counted)."""
        now = self._loop.time()
        self._arrivals = [t for t in self._arrivals if t > now - 1.0]
        if len(self._arrivals) >= UPLOADS_PER_S:
            return 1.0 - (now - self._arrivals[-1])
        self._arrivals.append(now)
        return None

    def create(self, request: dict[str, Any]) -> Task:
        now = self._loop.time()
        task = Task(
            id=str(uuid.UUID(int=self._rng.getrandbits(128), version=4)),
            reference=request.get("reference") or "",
            constraints={k: list(v) for k, v in request["constraints"].items()},
            scm_data=dict(request["scm_data"]),
            campaign=request.get("campaign"),
            created=now,
            visible_from=now + self._rng.uniform(0, self.faults.list_lag_s),
        )
        self.tasks[task.id] = task
        self.log.append(f"{now:9.3f} api: task {task.id[:8]} created ({task.reference})")
        self.spawn(self._run(task))
        return task

    async def _run(self, task: Task) -> None:
        await asyncio.sleep(self._rng.uniform(*self.faults.pending_s))
        task.state, task.started = "in-progress", self._loop.time()
        await asyncio.sleep(self._rng.uniform(*self.faults.running_s))
        matched: set[int] = set()
        for key, values in task.constraints.items():
            for value in values:
                matched.update(self._index.get(key, {}).get(value, ()))
        changed = []
        for position in sorted(matched):
            code = self.codes[position]
            code.fields.update(task.scm_data)
            changed.append(code.extended_id)
        task.state, task.completed = "complete", self._loop.time()
        task.codes_affected = len(changed)
        self.applied.append(
            Applied(
                task.id,
                task.completed,
                task.reference,
                task.constraints,
                task.scm_data,
                tuple(changed),
            )
        )
        self.log.append(
            f"{task.completed:9.3f} api: task {task.id[:8]} applied to {len(changed)} codes"
        )

    def listed(self, reference: str | None) -> list[Task]:
        now = self._loop.time()
        return [
            task
            for task in reversed(self.tasks.values())
            if task.visible_from <= now and (reference is None or task.reference == reference)
        ]


class SimApiClient:
    """One replica's API client (see the module's docstring)."""

    def __init__(
        self,
        vendor: VendorApi,
        rng: random.Random,
        wall_clock: Callable[[], float],
        request_timeout_s: float,
    ) -> None:
        self._vendor = vendor
        self._rng = rng
        self._wall = wall_clock
        self._timeout_s = request_timeout_s
        self.breaker_state = BreakerState.CLOSED

    async def _round_trip(self, serve: Callable[[], Any], *, timeout_s: float) -> Any:
        """Send a request: it travels, is served and travels back on the network's own
        time; the caller waits for the answer at most `timeout_s` (None: timed out)."""
        answer: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        vendor = self._vendor

        async def travel() -> None:
            await asyncio.sleep(vendor.latency())
            result = serve()
            await asyncio.sleep(vendor.latency())
            if not answer.done():
                answer.set_result(result)

        vendor.spawn(travel())
        try:
            async with asyncio.timeout(timeout_s):
                return await answer
        except TimeoutError:
            return None

    def reserve_upload_slot(self) -> None:
        """No slots here: the upload goes when it is made."""
        return None

    async def upload(
        self,
        request: UploadRequest,
        *,
        send_by: float | None = None,
        deadline: float | None = None,
        slot: object = None,
    ) -> UploadOutcome | Expired:
        closed = send_window_closed(
            send_by, deadline, self._wall(), asyncio.get_running_loop().time()
        )
        if closed is not None:
            return closed
        vendor, faults, draw = self._vendor, self._vendor.faults, self._rng.random()
        body = request.model_dump(mode="json")
        fate = "ok"
        for name, chance in (
            ("lost", faults.lost_after_create),
            ("error_after", faults.error_after_create),
            ("error_before", faults.error_before_create),
            ("timeout_before", faults.timeout_before_create),
            ("slow_after", faults.slow_after_create),
        ):
            if draw < chance:
                fate = name
                break
            draw -= chance

        def serve() -> Any:
            wait = vendor.throttled()
            if wait is not None:
                return Throttled(max(1.0, wait), "throttled")
            if fate in ("error_before", "timeout_before"):
                return fate
            task = vendor.create(body)
            return (fate, task.id)

        outcome = await self._round_trip(serve, timeout_s=self._timeout_s)
        if isinstance(outcome, Throttled):
            return outcome
        if outcome is None or outcome == "timeout_before":
            return Ambiguous("no answer before the request timeout")
        if outcome == "error_before":
            return Ambiguous("503 from a gateway", 503)
        fate, task_id = outcome
        if fate == "ok":
            return Accepted(task_id)
        if fate == "error_after":
            return Ambiguous("502 from a gateway", 502)
        if fate == "lost":
            return Ambiguous("connection reset before the answer")
        # slow_after: the answer would come after the timeout
        await asyncio.sleep(self._timeout_s)
        return Ambiguous("no answer before the request timeout")

    async def _read(self, serve: Callable[[], Any]) -> Any:
        if self._rng.random() < self._vendor.faults.read_unavailable:
            await asyncio.sleep(self._timeout_s)
            return Unavailable("no answer before the request timeout")
        result = await self._round_trip(serve, timeout_s=self._timeout_s)
        return Unavailable("no answer") if result is None else result

    async def task(self, task_id: str) -> ApiTask | Failure:
        def serve() -> Any:
            task = self._vendor.tasks.get(task_id)
            if task is None:
                return Unavailable(f"404 {task_id}")
            return task.view(details=True)

        result: ApiTask | Failure = await self._read(serve)
        return result

    async def tasks(self, task_ids: Sequence[str]) -> TaskPage | Failure:
        ids = list(task_ids)

        def serve() -> Any:
            known = self._vendor.tasks
            return TaskPage([known[i].view(details=False) for i in ids if i in known])

        result: TaskPage | Failure = await self._read(serve)
        return result

    async def list_tasks(
        self,
        *,
        state: str | None = None,
        reference: str | None = None,
        created_at: str | None = None,
    ) -> TaskPage | Failure:
        def serve() -> Any:
            tasks = self._vendor.listed(reference)
            return TaskPage(
                [t.view(details=False) for t in tasks if state is None or t.state == state]
            )

        result: TaskPage | Failure = await self._read(serve)
        return result

    async def me(self, *, retry: bool = True) -> dict[str, Any] | Failure:
        await asyncio.sleep(self._vendor.latency() * 2)
        return {"id": 1638, "email": "simulation@scm-relay.invalid"}

    async def reload_token(self) -> bool:
        return False
