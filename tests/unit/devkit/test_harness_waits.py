"""The harness's one polling loop: it returns once its condition holds, and its failure
names what was awaited, a callable `what` saying what was seen last."""

from __future__ import annotations

import pytest

from devkit.harness import wait_until


async def test_a_condition_met_on_its_third_look_ends_the_wait() -> None:
    looks: list[int] = []

    async def third() -> bool:
        looks.append(1)
        return len(looks) == 3

    await wait_until(third, timeout_s=5, interval_s=0)
    assert len(looks) == 3


async def test_a_callable_what_is_asked_at_the_timeout_for_what_was_seen_last() -> None:
    seen: list[int] = []

    def count() -> bool:
        seen.append(len(seen))
        return False

    with pytest.raises(TimeoutError) as raised:
        await wait_until(count, what=lambda: f"ten looks, seen {seen[-1]}", timeout_s=0.05)
    assert str(raised.value) == f"timed out after 0.05 s waiting for ten looks, seen {seen[-1]}"
    assert seen[-1] >= 1


async def test_a_text_what_is_named_as_it_is() -> None:
    with pytest.raises(TimeoutError, match=r"waiting for the broker to list the topic$"):
        await wait_until(lambda: False, what="the broker to list the topic", timeout_s=0.02)
