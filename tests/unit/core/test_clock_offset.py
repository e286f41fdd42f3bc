"""The host's clock offset against the API's, bounded by the answers' `Date` seconds."""

from __future__ import annotations

import math
import random

import pytest

from service.core.clock_offset import ClockOffset


def answers(offset: float, count: int, rtt: float, seed: int = 1) -> ClockOffset:
    """`count` answers of a server whose clock is `offset` behind this host's, each
    taking `rtt` (the server reads its clock half way), sent at random fractions."""
    rng = random.Random(seed)
    estimate = ClockOffset()
    local = 1_000_000.0
    for _ in range(count):
        local += rng.uniform(0.05, 0.4)
        server_reads = local + rtt / 2 - offset
        estimate.sample(local, local + rtt, math.floor(server_reads))
    return estimate


@pytest.mark.parametrize("offset", [0.0, 0.013, -0.25, 3.7])
def test_many_answers_bound_the_offset_to_about_a_round_trip(offset: float) -> None:
    found = answers(offset, 400, rtt=0.02).offset
    assert found is not None
    assert found.seconds - found.uncertainty <= offset <= found.seconds + found.uncertainty
    assert found.uncertainty <= 0.02, "the bounds did not narrow below a second"


def test_one_answer_leaves_a_second_of_doubt() -> None:
    estimate = ClockOffset()
    found = estimate.sample(100.2, 100.25, 100)
    assert found is not None
    assert found.uncertainty == pytest.approx(0.525)
    assert found.seconds - found.uncertainty <= 0.0 <= found.seconds + found.uncertainty


def test_a_stepped_clock_starts_the_bounds_again() -> None:
    estimate = answers(0.0, 300, rtt=0.02)
    # The host's clock steps 5 s ahead: the old bounds cannot hold with the new answers.
    local = 2_000_000.0
    for n in range(300):
        sent = local + n * 0.137
        estimate.sample(sent, sent + 0.02, math.floor(sent + 0.01 - 5.0))
    found = estimate.offset
    assert found is not None
    assert abs(found.seconds - 5.0) <= found.uncertainty + 1e-9


def test_no_answer_no_offset() -> None:
    assert ClockOffset().offset is None
    with pytest.raises(ValueError, match="at least one"):
        ClockOffset(window=0)


async def test_the_client_measures_its_offset_from_the_answers_date() -> None:
    """Against a server whose clock is 3 s ahead of this host's, over loopback HTTP."""
    import asyncio
    import time
    from email.utils import formatdate

    from aiohttp import web

    from tests.api_support import RecordingObserver, client

    async def answer(_request: web.Request) -> web.Response:
        ahead = formatdate(time.time() + 3.0, usegmt=True)
        return web.json_response({"detail": "not found"}, status=404, headers={"Date": ahead})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    observer = RecordingObserver()
    try:
        async with client(f"http://127.0.0.1:{port}", observer) as api:
            for _ in range(40):
                await api.task("t1")
                await asyncio.sleep(0.037)  # answers at other fractions of a second
    finally:
        await runner.cleanup()
    found = observer.clock_offsets[-1]
    assert found.seconds - found.uncertainty <= -3.0 <= found.seconds + found.uncertainty
    assert found.uncertainty < 0.5, "the bounds did not narrow"
