"""The chaos cases: what each breaks, and when.

Each case is `async def case(env: Env) -> Row`; `CASES` lists them in the order
of docs/reliability.md. Sizes and counts come from `env` (full for `make chaos`,
small for the smoke inside `make test`).
"""

from __future__ import annotations

import asyncio
import random
import signal
import time
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from chaos import netns
from chaos.backlog import interleaved
from chaos.broker import Broker
from chaos.harness import STEADY, Case, Row, Size, running_case
from tests.integration.test_exactly_once import after_resume


@dataclass
class Env:
    """Where and how big a chaos run is."""

    broker: Broker
    size: Size
    logs: Path
    smoke: bool
    rng: random.Random

    def times(self, full: int, smoke: int) -> int:
        return smoke if self.smoke else full

    def seconds(self, full: float, smoke: float) -> float:
        return smoke if self.smoke else full

    def case(self, name: str, fault: str, **options: Any) -> AbstractAsyncContextManager[Case]:
        """`running_case` on this run's broker, at its size, logging to its folder."""
        return running_case(name, fault, self.broker.bootstrap, self.size, self.logs, **options)


async def relay_sigkill(env: Env) -> Row:
    kills = env.times(20, 3)
    size = Size(
        codes=env.size.codes * 2,
        sequences=env.size.sequences,
        invalid=env.size.invalid,
        partitions=env.size.partitions,
    )
    async with running_case(
        "relay_sigkill",
        f"relay SIGKILL x {kills} at random moments",
        env.broker.bootstrap,
        size,
        env.logs,
    ) as case:
        for kill in range(kills):
            process = await case.relay(f"k{kill}")
            await case.progress(env.rng.randint(2, 8), timeout_s=180)
            process.send_signal(signal.SIGKILL)
            await process.wait()
        case.fault_over()
        last = await case.relay("last")
        return await case.finish({"last": last})


async def relay_sigterm(env: Env) -> Row:
    stops = env.times(5, 2)
    async with env.case("relay_sigterm", f"relay SIGTERM x {stops}") as case:
        for stop in range(stops):
            process = await case.relay(f"t{stop}")
            # Each SIGTERM lands on a relay that runs: once the backlog is drained,
            # `progress` returns at once, and a SIGTERM sent then reached a process whose
            # interpreter had not run a line yet (exit -15, an empty log).
            await case.joined(f"t{stop}")
            await case.progress(env.rng.randint(3, 10), timeout_s=180)
            if await case.stop(process, f"t{stop}") != 0:
                case.row.notes.append(f"SIGTERM {stop}: exit {process.returncode}")
        case.fault_over()
        last = await case.relay("last")
        return await case.finish({"last": last})


async def relay_paused(env: Env) -> Row:
    pause = env.seconds(30, 15)
    async with env.case(
        "relay_paused",
        f"one of two relays SIGSTOPped {pause:g} s",
        upload_rate_per_s=5,
    ) as case:
        # The paused one at DEBUG: its log shows every commit that moved offsets.
        paused = await case.relay("paused", log_level="DEBUG")
        other = await case.relay("other")
        await case.progress(15)
        # Paused while it holds partitions (on a busy machine it may still be starting).
        await case.joined("paused")
        await case.joined("other")
        paused.send_signal(signal.SIGSTOP)
        await asyncio.sleep(pause)
        resumed = datetime.now(UTC)
        paused.send_signal(signal.SIGCONT)
        case.fault_over()
        row = await case.finish({"other": other, "paused": paused})
        zombie = after_resume(case.log_path("paused"), resumed)
        created_at = {task.id: task.created_at for task in case.sim.account.tasks.values()}
        problems = zombie.problems(resumed, created_at)
        row.other_wrong += len(problems)
        row.notes.append(
            f"the paused relay after its resume: {zombie.count('relay_fenced')} fenced "
            f"transaction(s), {zombie.count('batch_abandoned')} batch(es) given up, "
            + ("then restarted in-process" if zombie.restarted else "never restarted")
            + "".join(f"; WRONG: {problem}" for problem in problems)
        )
        return row


async def scale_1_3_1(env: Env) -> Row:
    async with env.case(
        "scale_1_3_1",
        "scale 1 -> 3 -> 1 replicas mid-run",
    ) as case:
        first = await case.relay("r0")
        await case.progress(env.times(30, 8))
        extra = [await case.relay("r1"), await case.relay("r2")]
        await case.joined("r1")
        await case.joined("r2")
        await case.progress(env.times(60, 10))
        for n, process in enumerate(extra, start=1):
            if await case.stop(process, f"r{n}") != 0:
                case.row.notes.append(f"r{n} exited {process.returncode}")
        case.fault_over()
        return await case.finish({"r0": first})


async def broker_sigkill(env: Env) -> Row:
    kills = env.times(5, 2)
    async with env.case(
        "broker_sigkill",
        f"broker SIGKILL and restart on its data x {kills}, the last while a relay restarts",
    ) as case:
        relay = await case.relay("r0")
        for kill in range(kills):
            await case.progress(env.rng.randint(5, 15), timeout_s=240)
            env.broker.crash()
            if kill == kills - 1:
                relay.send_signal(signal.SIGKILL)
                await relay.wait()
                relay = await case.relay(f"r{kill + 1}")  # starts while the broker is down
            await asyncio.sleep(env.rng.uniform(1, 5))
            await asyncio.to_thread(env.broker.restart)
            case.fault_over()
        return await case.finish({"relay": relay})


async def broker_paused(env: Env) -> Row:
    pause = env.seconds(30, 10)
    async with env.case("broker_paused", f"broker SIGSTOPped {pause:g} s") as case:
        relay = await case.relay("r0")
        await case.progress(10)
        env.broker.pause()
        try:
            await asyncio.sleep(pause)
        finally:
            env.broker.resume()
        case.fault_over()
        return await case.finish({"r0": relay})


async def cluster_leader_lost(env: Env) -> Row:
    down = env.seconds(30, 10)
    fault = (
        "3-node KRaft cluster (replication 3, min.insync.replicas 2): the node leading "
        f"every input partition SIGKILLed, restarted {down:g} s later"
    )
    # A backlog long enough (over 10 s of uploads at smoke size) that a busy machine cannot
    # drain it between the 10th upload and the kill: the kill must land mid-drain.
    size = Size(
        codes=env.size.codes * env.times(2, 4),
        sequences=env.size.sequences,
        invalid=env.size.invalid,
        partitions=env.size.partitions,
    )
    cluster = Broker(env.logs / "cluster", nodes=3)
    await asyncio.to_thread(cluster.start)
    try:
        async with running_case(
            "cluster_leader_lost",
            fault,
            cluster.bootstrap,
            size,
            env.logs,
            replicas=3,
            leader=1,
        ) as case:
            relay = await case.relay("r0")
            await case.progress(10)
            assert set((await cluster.leaders(case.topics.input)).values()) == {1}
            committed = await cluster.committed(case.topics.group)
            await asyncio.to_thread(cluster.crash, 1)
            killed = time.monotonic()
            accepted = case.sim.account.stats.uploads_accepted
            assert accepted < size.uploads, "the backlog was drained before the kill"
            # Recovery here is the fail-over: from the kill to the next upload.
            case.fault_over()
            while (await cluster.committed(case.topics.group) or 0) <= (committed or 0):
                if time.monotonic() - killed > 180:
                    tail = case.log_path("r0").read_text().splitlines()[-60:]
                    raise AssertionError(
                        "no offsets committed in 180 s after the kill; the relay's log ends:\n"
                        + "\n".join(tail)
                    )
                await asyncio.sleep(0.2)
            commit_s = time.monotonic() - killed
            moved = await cluster.leaders(case.topics.input)
            await asyncio.sleep(down)
            await asyncio.to_thread(cluster.restart, 1)
            row = await case.finish({"r0": relay})
            row.notes.append(
                f"input leaders after the kill: node(s) {sorted(set(moved.values()))}; "
                f"offsets committed again {commit_s:.1f} s after it"
            )
            return row
    finally:
        await asyncio.to_thread(cluster.stop)


async def network_cut(env: Env) -> Row:
    seconds = env.seconds(60, 10)
    fault = f"the relay cut off the network (veth down) for {seconds:g} s, then healed"
    why_not = netns.available()
    if why_not is not None:
        return Row(case="network_cut", fault=fault, skipped=why_not)
    with netns.namespace() as space:
        # A broker and a simulator the namespace reaches over the veth pair.
        broker = Broker(env.logs / "veth-broker", host=netns.HOST_ADDRESS)
        await asyncio.to_thread(broker.start)
        try:
            async with running_case(
                "network_cut",
                fault,
                broker.bootstrap,
                env.size,
                env.logs,
                sim_host=netns.HOST_ADDRESS,
                # The simulator listens on the veth's host end, not loopback: plain HTTP
                # there is refused unless allowed (the relay warns at start).
                api_allow_insecure_http=True,
            ) as case:
                relay = await case.relay("r0", prefix=space.prefix)
                await case.progress(10)
                space.cut()
                try:
                    await asyncio.sleep(seconds)
                finally:
                    space.heal()
                case.fault_over()
                return await case.finish({"r0": relay})
        finally:
            await asyncio.to_thread(broker.stop)


# Requests of up to 250 values: the large events are cut across several, and the
# backlog drains in well under a minute at the API's 10 uploads per second.
INTERLEAVED_MAX_VALUES = 250


def interleaved_case(env: Env, name: str, what: str) -> AbstractAsyncContextManager[Case]:
    """A case draining a few thousand interleaved events over every input partition
    (chaos/backlog.py), broken as `what` says."""
    backlog = interleaved(env.rng, events=env.times(3000, 600), partitions=env.size.partitions)
    fault = (
        f"{what}; {backlog.events} events (1 to {backlog.largest} values, {backlog.values} "
        "in all) of 5 interleaved scm_data groups, shared references, A, B, A codes"
    )
    return env.case(
        name,
        fault,
        backlog=backlog,
        batch_max_values=INTERLEAVED_MAX_VALUES,
    )


async def interleaved_sigkill(env: Env) -> Row:
    async with interleaved_case(env, "interleaved_sigkill", "relay SIGKILL mid-drain") as case:
        first = await case.relay("k0")
        await case.progress(case.uploads // 3, timeout_s=180)
        first.send_signal(signal.SIGKILL)
        await first.wait()
        case.moment("killed")
        case.fault_over()
        last = await case.relay("last")
        return await case.finish({"last": last})


async def interleaved_join(env: Env) -> Row:
    joins = "a second replica joins mid-drain"
    async with interleaved_case(env, "interleaved_join", joins) as case:
        first = await case.relay("r0")
        await case.progress(case.uploads // 4, timeout_s=180)
        second = await case.relay("r1")
        await case.joined("r1")
        case.moment("r1 joined")
        case.fault_over()
        return await case.finish({"r0": first, "r1": second})


async def interleaved_leave(env: Env) -> Row:
    what = "one of two replicas leaves (SIGTERM) mid-drain"
    async with interleaved_case(env, "interleaved_leave", what) as case:
        stays = await case.relay("r0")
        leaves = await case.relay("r1")
        await case.joined("r0")
        await case.joined("r1")
        await case.progress(case.uploads // 3, timeout_s=180)
        if await case.stop(leaves, "r1") != 0:
            case.row.notes.append(f"r1 exited {leaves.returncode} at its SIGTERM")
        case.moment("r1 left")
        case.fault_over()
        return await case.finish({"r0": stays})


def api_storm(
    name: str,
    fault: str,
    knobs: Callable[[float], dict[str, object]],
    full_s: float = 60,
    smoke_s: float = 10,
    **settings: Any,
) -> Callable[[Env], Awaitable[Row]]:
    """A case that turns simulator knobs on for a while (given its length), then back."""

    async def case_fn(env: Env) -> Row:
        seconds = env.seconds(full_s, smoke_s)
        async with env.case(
            name,
            fault.format(seconds=seconds),
            **settings,
        ) as case:
            relay = await case.relay("r0")
            await case.progress(10)
            turned = knobs(seconds)
            await case.sim.set_faults(**turned)
            await asyncio.sleep(seconds)
            await case.sim.set_faults(**{key: STEADY.model_dump()[key] for key in turned})
            case.fault_over()
            return await case.finish({"r0": relay})

    case_fn.__name__ = name
    return case_fn


async def api_lost_answers(env: Env) -> Row:
    faults = STEADY.model_copy(update={"drop_response_rate": 0.3})
    async with env.case(
        "api_lost_answers",
        "30 % of upload answers lost (all run)",
        faults=faults,
    ) as case:
        relay = await case.relay("r0")
        row = await case.finish({"r0": relay})
        row.notes.append(f"{case.sim.account.stats.responses_dropped} answers dropped")
        return row


CASES: list[Callable[[Env], Awaitable[Row]]] = [
    relay_sigkill,
    relay_sigterm,
    relay_paused,
    scale_1_3_1,
    interleaved_sigkill,
    interleaved_join,
    interleaved_leave,
    broker_sigkill,
    broker_paused,
    cluster_leader_lost,
    network_cut,
    api_storm(
        "api_5xx_storm",
        "every API request answered 503 for {seconds:g} s",
        lambda _s: {"error_rate": 1.0},
    ),
    api_storm(
        "api_429_storm",
        "every API request answered 429 for {seconds:g} s",
        lambda seconds: {"throttle_storm_s": seconds},
    ),
    api_lost_answers,
    api_storm(
        "api_latency",
        "5 s added to every API request for {seconds:g} s (request timeout 10 s)",
        lambda _s: {"latency_s": 5.0},
        api_request_timeout_s=10.0,
    ),
    api_storm(
        "api_token_revoked",
        "the token refused (401) for {seconds:g} s, then accepted again",
        lambda _s: {"token_revoked": True},
    ),
]
