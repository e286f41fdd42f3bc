"""An interleaved backlog, as a day's export from several production lines looks.

Five scm_data groups (batch numbers G0 to G4) interleave in every partition;
events carry 1 to 1 500 values (so that large ones are cut across requests);
a few user references are shared by many events; some codes are changed A, B,
A (three events, in order, in one partition, under one reference); a few
records are not JSON. Each code is named by one event only, except the A, B, A
ones, so what the API must end with follows from the backlog alone: every code
updated once per event naming it, in the partition's order.

Written from the event contract and Kafka's ordering rule (order holds within a
partition), not from the relay's code.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaProducer

GROUPS = 5
REFERENCES = ("line-1", "line-2", "line-3", "line-7")
INVALID = b"{not json"


@dataclass(frozen=True)
class Backlog:
    """Records per partition in publishing order, and what the API must end with."""

    partitions: list[list[bytes]]
    # extended id -> the batch numbers it must be given, in that order
    expected: dict[str, list[str]]
    events: int
    values: int
    largest: int

    def uploads(self, batch_max_values: int) -> int:
        """Upload requests the backlog needs at least."""
        return -(-self.values // batch_max_values)


def _size(rng: random.Random) -> int:
    draw = rng.random()
    if draw < 0.85:
        return rng.randint(1, 6)
    if draw < 0.97:
        return rng.randint(7, 40)
    if draw < 0.997:
        return rng.randint(41, 300)
    return rng.randint(1000, 1500)


def _event(codes: list[str], group: str, reference: str, event_id: str) -> bytes:
    body: dict[str, Any] = {
        "constraints": {"extended_id": codes},
        "scm_data": {"batch_number": group},
        "reference": reference,
        "event_id": event_id,
    }
    return json.dumps(body).encode()


def interleaved(
    rng: random.Random,
    events: int,
    partitions: int = 6,
    sequences: int = 40,
    invalid: int = 5,
    large: int = 4,
) -> Backlog:
    """`events` events over `partitions`, `large` of them with 1 000 to 1 500 values
    besides those the size draw makes large, plus `sequences` sets of 1 to 20 codes
    changed A, B, A, and `invalid` records that are not JSON, at random places."""
    lanes: list[list[bytes]] = [[] for _ in range(partitions)]
    expected: dict[str, list[str]] = {}
    next_code = 0
    largest = 0
    values = 0

    def codes(count: int) -> list[str]:
        nonlocal next_code
        named = [f"11X{n:06d}" for n in range(next_code, next_code + count)]
        next_code += count
        return named

    for n in range(events):
        count = rng.randint(1000, 1500) if n < large else _size(rng)
        named = codes(count)
        group = f"G{rng.randrange(GROUPS)}"
        lane = lanes[rng.randrange(partitions)]
        record = _event(named, group, rng.choice(REFERENCES), f"e{n}")
        lane.insert(rng.randint(0, len(lane)), record)
        for code in named:
            expected[code] = [group]
        largest, values = max(largest, count), values + count
    for s in range(sequences):
        named = codes(rng.randint(1, 20))
        a, b = rng.sample([f"G{g}" for g in range(GROUPS)], 2)
        reference = rng.choice(REFERENCES)
        lane = lanes[rng.randrange(partitions)]
        # Three places in order, spread over the partition.
        places = sorted(rng.randint(0, len(lane)) for _ in range(3))
        for step, (place, value) in enumerate(zip(places, (a, b, a), strict=True)):
            lane.insert(place + step, _event(named, value, reference, f"s{s}-{step}"))
        for code in named:
            expected[code] = [a, b, a]
        values += 3 * len(named)
    for _ in range(invalid):
        lane = lanes[rng.randrange(partitions)]
        lane.insert(rng.randint(0, len(lane)), INVALID)
    return Backlog(lanes, expected, events + 3 * sequences, values, largest)


async def publish_lanes(
    bootstrap: str, topic: str, lanes: list[list[bytes]]
) -> list[tuple[int, int, bytes]]:
    """Publish each lane to its partition, in order; returns (partition, offset, value)
    of every record."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True)
    await producer.start()
    try:
        sent = [
            (partition, value, await producer.send(topic, value, partition=partition))
            for partition, lane in enumerate(lanes)
            for value in lane
        ]
        landed = [(partition, (await future).offset, value) for partition, value, future in sent]
    finally:
        await producer.stop()
    return landed
