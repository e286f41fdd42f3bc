"""The simulator's HTTP side: the documented Scantrust endpoints plus `/_sim/` controls.

It simulates the documented Scantrust SCM API for local use (tests, the demo,
teams without a staging account). It is not Scantrust.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from typing import Any, Final

import structlog
from aiohttp import web
from pydantic import ValidationError

from devkit.simulator.state import Account, Faults
from devkit.simulator.tasks import Task
from devkit.simulator.throttling import retry_after, throttled_body
from devkit.simulator.validation import UploadInvalid

log = structlog.get_logger(__name__)

BANNER: Final = (
    "scm-relay simulator: a LOCAL SIMULATION of the documented Scantrust SCM upload API, "
    "for tests, demos and teams without a staging account. It is not Scantrust and "
    "changes no real codes."
)
ACCOUNT: Final = web.AppKey("account", Account)
TOKEN: Final = web.AppKey("token", str)
WORKERS: Final = web.AppKey("workers", set[asyncio.Future[None]])
SIMULATED_USER: Final = {
    "id": 1638,
    "username": "simulator",
    "email": "simulator@scm-relay.invalid",
    "company": {"id": 1, "name": "Simulated company"},
}
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _json(body: Any, status: int = 200) -> web.Response:
    return web.json_response(body, status=status)


def _not_found() -> web.Response:
    return _json({"detail": "Not found."}, 404)


@web.middleware
async def api_gate(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Latency, outages, authentication, permission and throttling, in the order a
    real deployment applies them (gateway first, then the API framework)."""
    if not request.path.startswith("/api/"):
        return await handler(request)
    account = request.app[ACCOUNT]
    faults = account.faults
    route = request.match_info.route.name or "unknown"
    account.stats.requests[route] += 1
    refusal = await _gate(request, account, faults)
    response = refusal if refusal is not None else await handler(request)
    account.stats.statuses[f"{response.status // 100}xx"] += 1
    return response


async def _gate(request: web.Request, account: Account, faults: Faults) -> web.Response | None:
    # The request is still on its way: it arrives (and is throttled) only after this, so
    # requests sent in order may arrive closer together, or out of order.
    travel = account.one_way_delay()
    if travel:
        await asyncio.sleep(travel)
    if faults.latency_s:
        await asyncio.sleep(faults.latency_s)
    if account.rng.random() < faults.error_rate:
        return web.Response(status=503, text="<html><body>503 Service Unavailable</body></html>")
    authorization = request.headers.get("Authorization", "")
    if not authorization:
        return _json({"detail": "Authentication credentials were not provided."}, 401)
    scheme, _, token = authorization.partition(" ")
    if scheme != "UAT" or token != request.app[TOKEN] or faults.token_revoked:
        return _json({"detail": "Invalid token."}, 401)
    if faults.forbidden:
        return _json({"detail": "You do not have permission to perform this action."}, 403)
    is_upload = request.match_info.route.name == "upload"
    wait = account.throttle_wait(token, is_upload=is_upload, now=asyncio.get_running_loop().time())
    if wait is None or wait > 0:
        account.stats.throttled += 1
        seconds = retry_after(wait) if faults.retry_after_header else None
        headers = {"Retry-After": seconds} if seconds is not None else None
        return web.json_response(throttled_body(wait), status=429, headers=headers)
    return None


async def _json_body(request: web.Request) -> Any:
    try:
        return await request.json()
    except ValueError as exc:
        raise web.HTTPBadRequest(
            text=json.dumps({"detail": f"JSON parse error - {exc}"}),
            content_type="application/json",
        ) from None


async def upload(request: web.Request) -> web.StreamResponse:
    """`POST /api/v2/scm/upload/async/`."""
    account = request.app[ACCOUNT]
    try:
        task = account.validate_upload(await _json_body(request))
    except UploadInvalid as invalid:
        return _json(invalid.errors, 400)
    if account.upload_hook is not None:
        await account.upload_hook("received")
    values = sum(len(v) for v in task.constraints.values())
    account.register(task, values)
    if account.upload_hook is not None:
        await account.upload_hook("created")
    never_finish = account.rng.random() < account.faults.never_finish_rate
    _spawn(request.app, _process(account, task, never_finish=never_finish))
    if account.rng.random() < account.faults.drop_response_rate:
        # Processed, but the answer never arrives: the caller cannot know the task exists.
        account.stats.responses_dropped += 1
        if request.transport is not None:
            request.transport.close()
    if account.rng.random() < account.faults.hang_after_create_rate:
        # Processed, but the answer comes only after the caller's timeout (if ever).
        account.stats.answers_hung += 1
        await asyncio.sleep(account.faults.hang_s)
    if account.rng.random() < account.faults.error_after_create_rate:
        # A gateway that fails after the application created the task (a 5xx after sending).
        account.stats.errors_after_create += 1
        return web.Response(status=502, text="<html><body>502 Bad Gateway</body></html>")
    return _json({"task_id": task.id})


def _spawn(app: web.Application, work: Awaitable[None]) -> None:
    workers = app[WORKERS]
    worker = asyncio.ensure_future(work)
    workers.add(worker)
    worker.add_done_callback(workers.discard)


async def _process(account: Account, task: Task, *, never_finish: bool) -> None:
    faults = account.faults
    await asyncio.sleep(faults.pending_delay_s)
    account.start(task)
    if never_finish:
        return
    await asyncio.sleep(faults.progress_delay_s + account.rng.uniform(0, faults.jitter_s))
    account.finish(task)


async def one_task(request: web.Request) -> web.Response:
    """`GET /api/v2/scm/tasks/{id}/`."""
    task = request.app[ACCOUNT].tasks.get(request.match_info["task_id"])
    return _not_found() if task is None else _json(task.view(details=True))


def _page(request: web.Request, items: list[dict[str, Any]]) -> web.Response:
    size = request.app[ACCOUNT].faults.page_size
    try:
        number = int(request.query.get("page", "1"))
    except ValueError:
        number = 0
    last = max(1, -(-len(items) // size))
    if not 1 <= number <= last:
        return _json({"detail": "Invalid page."}, 404)

    def link(page: int) -> str | None:
        if not 1 <= page <= last:
            return None
        return str(request.url.update_query(page=str(page)))

    return _json(
        {
            "count": len(items),
            "next": link(number + 1),
            "previous": link(number - 1),
            "results": items[(number - 1) * size : number * size],
        }
    )


STATES: Final = ("pending", "in-progress", "complete", "failed")


async def task_list(request: web.Request) -> web.Response:
    """`GET /api/v2/scm/tasks/` with the documented filters, newest first."""
    state = request.query.get("state")
    if state is not None and state not in STATES:
        message = f"Select a valid choice. {state} is not one of the available choices."
        return _json({"state": [message]}, 400)
    reference = request.query.get("reference")
    created_at = request.query.get("created_at")
    tasks = [
        task.view(details=False)
        for task in reversed(request.app[ACCOUNT].tasks.values())
        if (state is None or task.state == state)
        and (reference is None or task.reference == reference)
        and (created_at is None or task.created_at == created_at)
    ]
    return _page(request, tasks)


async def bulk_tasks(request: web.Request) -> web.Response:
    """`POST /api/v2/scm/tasks/` with `{"task_ids": [...]}`: list-view shape, in the order asked."""
    body = await _json_body(request)
    ids = body.get("task_ids") if isinstance(body, dict) else None
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        return _json({"task_ids": ["A list of task ids is required."]}, 400)
    tasks = request.app[ACCOUNT].tasks
    return _page(request, [tasks[i].view(details=False) for i in ids if i in tasks])


async def task_group(request: web.Request) -> web.Response:
    """`GET /api/v2/scm/task-groups/{reference}/`."""
    reference = request.match_info["reference"]
    tasks = [t for t in request.app[ACCOUNT].tasks.values() if t.reference == reference]
    if not tasks:
        return _not_found()
    stats = {state: sum(t.state == state for t in tasks) for state in STATES}
    completed = stats["complete"] + stats["failed"] == len(tasks)
    started = [t.started_at for t in tasks if t.started_at]
    finished = [t.completed_at for t in tasks if t.completed_at]
    return _json(
        {
            "reference": reference,
            "tasks_count": len(tasks),
            "codes_affected": sum(t.codes_affected or 0 for t in tasks),
            "completed": completed,
            "state_stats": stats,
            "started_at": min(started) if started else None,
            "completed_at": max(finished) if completed and finished else None,
        }
    )


async def me(request: web.Request) -> web.Response:
    """`GET /api/v2/me/`."""
    return _json(SIMULATED_USER)


# -- simulator-only endpoints (no authentication: local use) ---------------------


async def get_faults(request: web.Request) -> web.Response:
    """`GET /_sim/faults`."""
    return _json(request.app[ACCOUNT].faults.model_dump())


async def set_faults(request: web.Request) -> web.Response:
    """`POST /_sim/faults`: change some knobs; the answer is all of them."""
    account = request.app[ACCOUNT]
    body = await _json_body(request)
    try:
        changed = Faults.model_validate({**account.faults.model_dump(), **body})
    except (ValidationError, TypeError) as exc:
        return _json({"detail": str(exc)}, 400)
    apply_faults(account, changed)
    log.info("simulator_faults", **body)
    return _json(account.faults.model_dump())


def apply_faults(account: Account, faults: Faults) -> None:
    """Install new fault knobs (at start or at run time). Changed rates apply to the
    throttle histories already there, as a changed DRF setting applies to its cache."""
    account.faults = faults
    if faults.throttle_storm_s:
        account.throttle_storm_until = asyncio.get_running_loop().time() + faults.throttle_storm_s
        account.faults = faults.model_copy(update={"throttle_storm_s": 0.0})


async def stats(request: web.Request) -> web.Response:
    """`GET /_sim/stats`: request counters and task states."""
    account = request.app[ACCOUNT]
    states: dict[str, int] = {state: 0 for state in STATES}
    for task in account.tasks.values():
        states[task.state] += 1
    return _json({**account.stats.view(), "tasks": states})


async def inspect_code(request: web.Request) -> web.Response:
    """`GET /_sim/codes?FIELD=VALUE`: one code, its SCM data and its update history."""
    if len(request.query) != 1:
        return _json({"detail": "give exactly one FIELD=VALUE query parameter"}, 400)
    ((key, value),) = request.query.items()
    code = request.app[ACCOUNT].find_code(key, value)
    return _not_found() if code is None else _json(code.view())


async def inspect_task(request: web.Request) -> web.Response:
    """`GET /_sim/tasks/{id}`: a task with its details, without authentication."""
    task = request.app[ACCOUNT].tasks.get(request.match_info["task_id"])
    return _not_found() if task is None else _json(task.view(details=True))


async def _workers(app: web.Application) -> AsyncIterator[None]:
    workers: set[asyncio.Future[None]] = set()
    app[WORKERS] = workers
    yield
    running: set[asyncio.Future[None]] = app[WORKERS]
    pending = list(running)
    for worker in pending:
        worker.cancel()
    await asyncio.gather(*pending, return_exceptions=True)


def build_app(account: Account, token: str) -> web.Application:
    """The simulator as an aiohttp application."""
    app = web.Application(middlewares=[api_gate])
    app[ACCOUNT] = account
    app[TOKEN] = token
    app.cleanup_ctx.append(_workers)
    app.router.add_post("/api/v2/scm/upload/async/", upload, name="upload")
    app.router.add_get("/api/v2/scm/tasks/", task_list, name="task_list")
    app.router.add_post("/api/v2/scm/tasks/", bulk_tasks, name="tasks_bulk")
    app.router.add_get("/api/v2/scm/tasks/{task_id}/", one_task, name="task")
    app.router.add_get("/api/v2/scm/task-groups/{reference}/", task_group, name="task_group")
    app.router.add_get("/api/v2/me/", me, name="me")
    app.router.add_get("/_sim/faults", get_faults)
    app.router.add_post("/_sim/faults", set_faults)
    app.router.add_get("/_sim/stats", stats)
    app.router.add_get("/_sim/codes", inspect_code)
    app.router.add_get("/_sim/tasks/{task_id}", inspect_task)
    return app


@asynccontextmanager
async def running_simulator(
    account: Account, token: str, host: str = "127.0.0.1", port: int = 0
) -> AsyncIterator[str]:
    """Serve the simulator on loopback; yields its base URL. Port 0 picks a free port."""
    runner = web.AppRunner(build_app(account, token), access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        bound_port = runner.addresses[0][1]
        yield f"http://{host}:{bound_port}"
    finally:
        await runner.cleanup()


async def serve(account: Account, token: str, host: str, port: int) -> None:
    """Run until SIGINT or SIGTERM (the `scm-relay simulator` command)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    async with running_simulator(account, token, host, port) as base_url:
        print(BANNER, file=sys.stderr)
        campaigns = ", ".join(str(c) for c in sorted(account.campaign_fields))
        print(
            f"scm-relay simulator: {len(account.codes)} codes in campaigns {campaigns}; "
            f"listening on {base_url} (API under /api/v2/, controls under /_sim/)",
            file=sys.stderr,
        )
        print(base_url, flush=True)
        await stop.wait()
    for signum in (signal.SIGINT, signal.SIGTERM):
        with suppress(ValueError):
            loop.remove_signal_handler(signum)
