"""The fault suite's smoke inside `make test`: a few cases of chaos at small size.

`make chaos` runs every case at full size and writes docs/reliability.md; here a
relay killed three times, the broker killed and restarted on its data twice (a
broker of this test's own), the relay cut off the network for 10 s (a network
namespace; where there is no root to make one, that case says so and is
skipped), a 3-node cluster losing the node that leads every input partition, a
5xx storm and a revoked token must each end clean:
nothing lost, nothing twice, A, B, A kept, every task recorded once with one
result, every dead letter once, no 429.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from chaos import netns
from chaos.broker import Broker
from chaos.cases import CASES, Env
from chaos.harness import SMOKE, Row

pytestmark = pytest.mark.kafka
BY_NAME = {case.__name__: case for case in CASES}
ON_THE_SESSION_BROKER = [
    "relay_sigkill",
    "interleaved_sigkill",
    "api_5xx_storm",
    "api_token_revoked",
]


@pytest.fixture(scope="module")
def own_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    broker = Broker(tmp_path_factory.mktemp("chaos-broker"))
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


async def run_smoke(case: Callable[[Env], Awaitable[Row]], broker: Broker, logs: Path) -> Row:
    row = await case(Env(broker=broker, size=SMOKE, logs=logs, smoke=True, rng=random.Random(5)))
    print(f"\n{row}")
    return row


def assert_clean(row: Row) -> None:
    assert row.skipped is None, row
    assert row.other_wrong == 0, row
    assert row.lost == 0, row
    assert row.twice == 0, row
    assert row.out_of_order == 0, row
    assert row.not_recorded_once == 0, row
    assert row.not_one_result == 0, row
    assert row.dead_letters_wrong == 0, row
    assert row.throttled == 0, row
    assert row.tasks > 0, row
    assert row.recovery_s is not None, f"nothing was sent after the fault: {row}"


@pytest.mark.timeout(400)
@pytest.mark.parametrize("name", ON_THE_SESSION_BROKER)
async def test_smoke_case_ends_clean(name: str, kafka_bootstrap: str, tmp_path: Path) -> None:
    session = Broker(tmp_path / "unused")  # the session's broker: never killed here
    session.bootstrap = kafka_bootstrap
    # No 429 allowed, a kill or not: a restarted relay waits a settle period after its
    # first assignment (its predecessor may have sent a burst just before the kill), then
    # sends alone in a window of answered uploads, which needs no margin (issue 29).
    assert_clean(await run_smoke(BY_NAME[name], session, tmp_path))


@pytest.mark.timeout(600)
async def test_smoke_broker_sigkill_ends_clean(own_broker: Broker, tmp_path: Path) -> None:
    assert_clean(await run_smoke(BY_NAME["broker_sigkill"], own_broker, tmp_path))


@pytest.mark.timeout(600)
async def test_smoke_network_cut_ends_clean(tmp_path: Path) -> None:
    why_not = netns.available()
    if why_not is not None:
        pytest.skip(why_not)
    # The case starts a broker of its own on the veth address; `broker` is not used.
    unused = Broker(tmp_path / "unused")
    assert_clean(await run_smoke(BY_NAME["network_cut"], unused, tmp_path))


@pytest.mark.timeout(600)
async def test_smoke_cluster_losing_the_input_leader_ends_clean(tmp_path: Path) -> None:
    # The case starts a 3-node cluster of its own; `broker` is not used.
    unused = Broker(tmp_path / "unused")
    row = await run_smoke(BY_NAME["cluster_leader_lost"], unused, tmp_path)
    assert_clean(row)
    assert "input leaders after the kill: node(s) [1]" not in row.notes[-1], row
