"""The stages' one hand-off: a bounded `Mailbox`, whose end of stream is queued like a
message (ordered after what was told, waiting for room) and ends one receiver."""

from __future__ import annotations

import asyncio

from service.relay.messages import EndOfStream, Mailbox


async def test_the_end_comes_after_what_was_told_and_waits_for_room_like_a_message() -> None:
    inbox: Mailbox[str] = Mailbox(2)
    await inbox.tell("a")
    await inbox.tell("b")
    ending = asyncio.create_task(inbox.end())
    await asyncio.sleep(0.01)
    assert not ending.done(), "the end took a place the full inbox did not have"
    assert await inbox.next() == "a"
    await asyncio.wait_for(ending, 1)
    assert inbox.waiting(5) == ["b", EndOfStream()]
    assert inbox.empty


async def test_waiting_takes_at_most_its_limit_and_leaves_the_rest_in_order() -> None:
    inbox: Mailbox[int] = Mailbox(10)
    for number in range(4):
        await inbox.tell(number)
    await inbox.end()
    assert inbox.waiting(3) == [0, 1, 2]
    assert inbox.waiting(3) == [3, EndOfStream()]


async def test_taking_everything_drops_an_end_waiting_among_the_messages() -> None:
    inbox: Mailbox[str] = Mailbox(10)
    await inbox.tell("a")
    await inbox.end()
    await inbox.tell("b")
    assert inbox.take_all() == ["a", "b"]
    assert inbox.empty
    await inbox.end()
    await inbox.tell("c")
    assert await inbox.take(1.0) == ["c"], "an end first is dropped, what follows kept"
