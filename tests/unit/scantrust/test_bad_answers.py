"""Answers the documentation does not promise: none of them ends the relay or parks it."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from pydantic import AnyHttpUrl, SecretStr

from service.scantrust.client import ScantrustClient, UploadRequest
from service.scantrust.exchange import json_object
from service.scantrust.outcomes import (
    Ambiguous,
    ApiTask,
    Misconfigured,
    TaskApiState,
    TaskPage,
    Unavailable,
)
from service.settings import ApiSettings
from tests.api_support import raw_server

REQUEST = UploadRequest(constraints={"extended_id": ["a"]}, scm_data={"x": "1"})


def client(base_url: str) -> ScantrustClient:
    return ScantrustClient(
        ApiSettings(
            base_url=AnyHttpUrl(base_url),
            token=SecretStr("t0ken-under-test"),
            request_timeout_s=5.0,
            retry_max_elapsed_s=0.2,
            retry_initial_s=0.05,
        )
    )


async def test_a_header_over_the_parser_limit_is_an_outcome_not_a_crash() -> None:
    huge = b"HTTP/1.1 200 OK\r\nX-Padding: " + b"a" * 20_000 + b"\r\nContent-Length: 2\r\n\r\n{}"
    async with raw_server(huge) as url, client(url) as api:
        assert isinstance(await api.upload(REQUEST), Ambiguous)
        assert isinstance(await api.me(), Unavailable)


async def test_a_redirect_is_a_wrong_base_url_and_is_not_followed() -> None:
    moved = (
        b"HTTP/1.1 301 Moved\r\nLocation: https://elsewhere.invalid/\r\n"
        b"Connection: close\r\nContent-Length: 0\r\n\r\n"
    )
    async with raw_server(moved) as url, client(url) as api:
        outcome = await api.me()
        assert isinstance(outcome, Misconfigured)
        assert outcome.status == 301
        assert isinstance(await api.upload(REQUEST), Misconfigured)


def test_json_nested_too_deep_is_no_object() -> None:
    assert json_object("[" * 100_000 + "]" * 100_000) == {}
    assert json_object('{"detail": "x"}') == {"detail": "x"}


def test_an_undocumented_task_state_is_kept_not_refused() -> None:
    task = ApiTask.model_validate({"id": "t1", "state": "archived"})
    assert task.state == "archived"
    assert not task.known_state
    assert not task.finished
    done = ApiTask.model_validate({"id": "t2", "state": "complete"})
    assert done.state is TaskApiState.COMPLETE
    assert done.finished


@asynccontextmanager
async def paging_server(next_link: str) -> AsyncIterator[tuple[str, list[bytes]]]:
    """A list view whose first page links `next_link` (with `{port}` filled in) and whose
    second page ends the list; the request lines it saw are kept."""
    seen: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        seen.append(head.split(b"\r\n", 1)[0])
        second = b"page=2" in head.split(b"\r\n", 1)[0]
        link = "null" if second else json.dumps(next_link.format(port=port))
        body = f'{{"count": 1, "next": {link}, "previous": null, "results": []}}'.encode()
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", seen
    finally:
        server.close()
        await server.wait_closed()


async def test_a_next_link_to_another_host_is_refused_not_followed() -> None:
    link = "http://collector.invalid/api/v2/scm/tasks/?page=2"
    async with paging_server(link) as (url, seen), client(url) as api:
        outcome = await api.list_tasks(reference="r")
    assert isinstance(outcome, Misconfigured)
    assert len(seen) == 1


async def test_a_next_link_on_the_same_host_is_taken_to_the_base_url_s_scheme_and_port() -> None:
    # A DRF behind a proxy may link its own host on another scheme or port.
    link = "https://127.0.0.1:1/api/v2/scm/tasks/?page=2"
    async with paging_server(link) as (url, seen), client(url) as api:
        outcome = await api.list_tasks(reference="r")
    assert isinstance(outcome, TaskPage)
    assert [line.split(b" ")[1] for line in seen] == [
        b"/api/v2/scm/tasks/?reference=r",
        b"/api/v2/scm/tasks/?page=2",
    ]
