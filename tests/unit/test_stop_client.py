"""Stopping a Kafka client while a broker is down must not end the process.

aiokafka's fetcher cancels its in-flight fetch tasks on stop and awaits them without
catching their CancelledError (aio-libs/aiokafka#647, #983): `stop()` raises
CancelledError though nobody cancelled the caller. `stop_client` tells that apart from a
real cancellation of the caller."""

from __future__ import annotations

import asyncio

import pytest

from service.kafka import stop_client


class FetcherLikeClient:
    """Stops as aiokafka's fetcher does: cancel a pending fetch, then await it bare."""

    def __init__(self) -> None:
        self.fetch: asyncio.Task[None] | None = None
        self.stopped = False

    async def start(self) -> None:
        self.fetch = asyncio.create_task(asyncio.sleep(3600))  # a fetch in retry backoff
        await asyncio.sleep(0)

    async def stop(self) -> None:
        assert self.fetch is not None
        self.fetch.cancel()
        await self.fetch  # raises CancelledError: the library's, not the caller's
        self.stopped = True


async def test_the_library_s_own_cancellation_does_not_escape() -> None:
    client = FetcherLikeClient()
    await client.start()
    with pytest.raises(asyncio.CancelledError):
        await client.stop()  # what an unguarded teardown would see
    client = FetcherLikeClient()
    await client.start()
    await stop_client(client)  # no exception: the teardown goes on
    assert client.fetch is not None
    assert client.fetch.cancelled()


async def test_a_real_cancellation_of_the_caller_still_propagates() -> None:
    stopping = asyncio.Event()

    class SlowStop:
        async def stop(self) -> None:
            stopping.set()
            await asyncio.sleep(3600)

    task = asyncio.create_task(stop_client(SlowStop()))
    await stopping.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert task.cancelled()


async def test_other_errors_are_not_hidden() -> None:
    class Broken:
        async def stop(self) -> None:
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        await stop_client(Broken())
