"""The relay's own HTTP endpoints: /metrics, /healthz, /readyz (aiohttp)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Final

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

# /healthz fails when the heartbeat task has not run for this long: the loop is blocked.
HEARTBEAT_STALE_S: Final = 10.0


def build_http_app(
    registry: CollectorRegistry,
    readiness: Callable[[], list[str]],
    last_beat: Callable[[], float],
) -> web.Application:
    """The endpoints over the relay's registry and state."""

    async def metrics(request: web.Request) -> web.Response:
        encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
        return web.Response(body=encoder(registry), headers={"Content-Type": content_type})

    async def healthz(request: web.Request) -> web.Response:
        age = asyncio.get_running_loop().time() - last_beat()
        if age > HEARTBEAT_STALE_S:
            return web.json_response(
                {"status": "stalled", "heartbeat_age_s": round(age, 1)}, status=503
            )
        return web.json_response({"status": "ok", "heartbeat_age_s": round(age, 1)})

    async def readyz(request: web.Request) -> web.Response:
        reasons = readiness()
        if reasons:
            return web.json_response({"ready": False, "reasons": reasons}, status=503)
        return web.json_response({"ready": True})

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app


@asynccontextmanager
async def serving(app: web.Application, host: str, port: int) -> AsyncIterator[int]:
    """Serve `app`; yields the bound port (port 0 picks one)."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        yield int(runner.addresses[0][1])
    finally:
        await runner.cleanup()


def free_port() -> int:
    """A loopback port nothing listens on right now (the demo's, the tests' and the
    benchmarks' servers)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
