"""A simulator on real loopback HTTP, and clients pointed at it, for the API tests."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from pydantic import SecretStr

from devkit.simulator.app import running_simulator
from devkit.simulator.seed import default_seed
from devkit.simulator.state import Account, Faults
from service.core.clock_offset import Offset
from service.core.resilience import BreakerState
from service.scantrust.client import ScantrustClient
from service.settings import ApiSettings

TOKEN = "sim-token-3f9a"
# Instant task processing; tests that need delays set them.
FAST = Faults(pending_delay_s=0.0, progress_delay_s=0.0, jitter_s=0.0)


@dataclass
class Simulator:
    """A running simulator: its base URL and its account (for direct inspection)."""

    base_url: str
    account: Account

    async def set_faults(self, **knobs: Any) -> dict[str, Any]:
        """Change fault knobs through the simulator's own control endpoint."""
        url = f"{self.base_url}/_sim/faults"
        async with aiohttp.ClientSession() as session, session.post(url, json=knobs) as response:
            body: dict[str, Any] = await response.json()
            assert response.status == 200, body
            return body

    async def wait_uploads(self, at_least: int, timeout_s: float = 60) -> None:
        """Wait until the simulator has accepted `at_least` uploads in all."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while self.account.stats.uploads_accepted < at_least:
            assert asyncio.get_running_loop().time() < deadline, self.account.stats.view()
            await asyncio.sleep(0.05)

    async def get(self, path: str) -> tuple[int, Any]:
        """GET a simulator-only endpoint."""
        url = f"{self.base_url}{path}"
        async with aiohttp.ClientSession() as session, session.get(url) as response:
            return response.status, await response.json()


@asynccontextmanager
async def simulator(
    faults: Faults = FAST, codes_per_campaign: int = 50, host: str = "127.0.0.1"
) -> AsyncIterator[Simulator]:
    """Serve a simulator on `host` (loopback unless told) with a free port."""
    account = Account(default_seed(codes_per_campaign), faults, rng_seed=7)
    async with running_simulator(account, TOKEN, host) as base_url:
        yield Simulator(base_url, account)


@dataclass
class RecordingObserver:
    """Counts what the client reports, as the metrics will."""

    requests: Counter[str] = field(default_factory=Counter)
    retries: Counter[str] = field(default_factory=Counter)
    throttled_count: int = 0
    ambiguous_count: int = 0
    breaker_states: list[BreakerState] = field(default_factory=list)
    clock_offsets: list[Offset] = field(default_factory=list)

    def request_finished(self, endpoint: str, status_class: str, duration_s: float) -> None:
        self.requests[f"{endpoint} {status_class}"] += 1

    def retry_scheduled(self, endpoint: str, outcome: str, wait_s: float) -> None:
        self.retries[outcome] += 1

    def throttled(self, endpoint: str) -> None:
        self.throttled_count += 1

    def ambiguous(self, endpoint: str) -> None:
        self.ambiguous_count += 1

    def breaker_changed(self, state: BreakerState) -> None:
        self.breaker_states.append(state)

    def clock_offset(self, offset: Offset) -> None:
        self.clock_offsets.append(offset)


def config(base_url: str, token: str = TOKEN, **overrides: Any) -> ApiSettings:
    """A client configuration with quick retries for tests."""
    values: dict[str, Any] = {
        "base_url": base_url,
        "token": SecretStr(token),
        "retry_initial_s": 0.01,
        "retry_max_backoff_s": 0.05,
        "retry_max_elapsed_s": 2.0,
        "request_timeout_s": 5.0,
        "connect_timeout_s": 2.0,
    }
    values.update(overrides)
    # Not validated, so a test may go below a setting's floor (a 100-byte body limit).
    return ApiSettings.model_construct(**values)


@asynccontextmanager
async def client(
    base_url: str, observer: RecordingObserver | None = None, **overrides: Any
) -> AsyncIterator[ScantrustClient]:
    """A started client against `base_url`."""
    async with ScantrustClient(config(base_url, **overrides), observer) as started:
        yield started


@asynccontextmanager
async def raw_server(answer: bytes, received: list[bytes] | None = None) -> AsyncIterator[str]:
    """A TCP server that answers every request with these bytes, then closes; the head of
    each request it received goes to `received`."""

    open_writers: set[asyncio.StreamWriter] = set()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        open_writers.add(writer)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            writer.close()  # the client closed the connection without a request
            return
        if received is not None:
            received.append(head)
        writer.write(answer)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.close()
        for writer in open_writers:  # (Python 3.11's wait_closed waits for none of them)
            writer.close()
        await server.wait_closed()
