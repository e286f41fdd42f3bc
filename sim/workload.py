"""Realistic input drawn from the seed: what a day's export from several lines looks like.

Codes belong to lots, and each lot's events are keyed by the lot, so every change to a
code lands in one partition, in publication order (the order the relay must keep).
Events carry 1 to about three batches' worth of values (so some straddle batches),
several scm_data groups interleave in every partition (each group writes its own
fields), user references are shared by many events, some codes are changed A, B, A,
some events are published twice, and a few are invalid. The workload is the ground
truth the oracle judges against: which events are valid, what each changes.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Published:
    """One record as the publisher wrote it."""

    key: bytes
    value: bytes
    partition: int
    at: float  # virtual time of publication
    valid: bool
    # For a valid event: the codes (extended ids) it changes and the fields it sets.
    codes: tuple[str, ...] = ()
    scm_data: tuple[tuple[str, str], ...] = ()


@dataclass
class Workload:
    """The codes of the account and the records to publish."""

    codes: list[tuple[str, str]]  # (extended_id, rfid)
    records: list[Published] = field(default_factory=list)


GROUP_FIELDS = (
    ("intended_market", ("DE", "FR", "IT", "ES", "NL")),
    ("batch_number", ("B1", "B2", "B3")),
    ("production_date", ("2026-11-27", "2026-11-28")),
    ("lot_status", ("open", "closed")),
)
REFERENCES = ("line-7 shift B", "line-3", "night export")


def generate(
    rng: random.Random, *, partitions: int, batch_max_values: int, backlog: bool = False
) -> Workload:
    """A workload for one seed. A `backlog` is thousands of small events of many
    interleaved groups, waiting when the relay starts (a day's export from several
    lines): what spreads the offsets done above a partition's commit point."""
    lots = rng.randint(partitions, partitions * 3)
    per_lot = rng.randint(5, 60) if not backlog else rng.randint(200, 600)
    codes = [
        (f"L{lot:02d}X{n:04d}", f"E28011{lot:02d}{n:06d}")
        for lot in range(lots)
        for n in range(per_lot)
    ]
    workload = Workload(codes)
    lot_of_partition = {lot: lot % partitions for lot in range(lots)}
    # Each lot's codes are always selected by the same key (their extended ids, or their
    # RFID tags): the relay orders changes per (key, value, field), it cannot know that
    # a tag and an extended id name one code (docs/guarantees.md section 4).
    key_of_lot = {lot: rng.choice(["extended_id", "extended_id", "rfid"]) for lot in range(lots)}
    groups = rng.randint(2, len(GROUP_FIELDS) + 2) if not backlog else rng.randint(4, 8)
    scm_groups = []
    for _ in range(groups):
        scm_groups.append(rng.sample(GROUP_FIELDS, rng.randint(1, 2)))
    events = rng.randint(20, 160) if not backlog else rng.randint(1500, 4000)
    stream_from = rng.choice([0.0, 0.0, 5.0, 20.0]) if not backlog else 0.0
    last_value: dict[tuple[str, str], str] = {}
    shapes: dict[int, list[tuple[str, str]]] = {}  # the codes of a lot's last event
    for n in range(events):
        lot = rng.randrange(lots)
        members = codes[lot * per_lot : (lot + 1) * per_lot]
        size = _size(rng, batch_max_values, len(members)) if not backlog else rng.randint(1, 2)
        earlier = shapes.get(lot)
        if earlier and rng.random() < 0.2:
            chosen = list(earlier)  # the same codes again (a pallet changed A, B, A)
        else:
            chosen = rng.sample(members, size)
            shapes[lot] = chosen
        key_kind = key_of_lot[lot]
        values = [c[0] if key_kind == "extended_id" else c[1] for c in chosen]
        group = rng.choice(scm_groups)
        scm_data: dict[str, str] = {}
        for name, options in group:
            if rng.random() < 0.5 and chosen:
                # A, B, A: change back what an earlier event of this field set
                previous = last_value.get((chosen[0][0], name))
                scm_data[name] = previous if previous is not None else rng.choice(options)
            else:
                scm_data[name] = rng.choice(options)
        for code in chosen:
            for name, value in scm_data.items():
                last_value[(code[0], name)] = value
        document: dict[str, Any] = {
            "event_id": f"ev-{n}",
            "constraints": {
                key_kind: values if len(values) > 1 or rng.random() < 0.5 else values[0]
            },
            "scm_data": scm_data,
        }
        if rng.random() < 0.4:
            document["reference"] = rng.choice(REFERENCES)
        at = 0.0 if rng.random() < 0.6 or not stream_from else rng.uniform(0, stream_from * 3)
        partition = lot_of_partition[lot]
        record = Published(
            key=f"lot-{lot}".encode(),
            value=json.dumps(document).encode(),
            partition=partition,
            at=at,
            valid=True,
            codes=tuple(c[0] for c in chosen),
            scm_data=tuple(sorted(scm_data.items())),
        )
        workload.records.append(record)
        if rng.random() < 0.05:
            workload.records.append(record)  # published twice
        if rng.random() < 0.04:
            bad = {
                "event_id": f"bad-{n}",
                "constraints": {"extended_id": values[:1]},
                "scm_data": {"status": "1"},
            }
            workload.records.append(
                Published(record.key, json.dumps(bad).encode(), partition, at, valid=False)
            )
    # Publication order: by time, then as generated (stable).
    workload.records.sort(key=lambda r: r.at)
    return workload


def _size(rng: random.Random, batch_max_values: int, available: int) -> int:
    """Mostly small events, some of a batch or more (they straddle batches)."""
    roll = rng.random()
    if roll < 0.6:
        wanted = rng.randint(1, 5)
    elif roll < 0.85:
        wanted = rng.randint(5, batch_max_values)
    else:
        wanted = rng.randint(batch_max_values, batch_max_values * 3)
    return max(1, min(wanted, available))
