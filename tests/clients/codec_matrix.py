"""Every codec, every client: the relay against record batches as real producers write them.

Each case is one producer client (aiokafka, librdkafka, Kafka's Java producer), one
compression codec, in a transaction or not, publishing into a partition of its own, or
a topic whose `compression.type` makes the broker compress whatever arrives. One relay
run drains them all; each case is then judged from outside the relay: the simulator's
codes (each valid code updated exactly once, with its own change), the dead-letter
topic read with librdkafka (exactly the case's invalid records, by position), and the
group's committed offsets (each partition committed to its end).

`tests/integration/test_codecs.py` runs this on every `make test`; run as a program it
also rewrites the table of docs/kafka-compatibility.md with what it measured:

    python -m tests.clients.codec_matrix --write docs/kafka-compatibility.md

(with `SCM_RELAY_TEST_KAFKA=host:port`, or it starts a broker of its own).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from confluent_kafka import Consumer, KafkaError, TopicPartition

from devkit.harness import (
    TopicFactory,
    Topics,
    admin_client,
    end_offsets,
    start_broker,
    stop_broker,
    unique_name,
)
from tests.api_support import Simulator, simulator
from tests.clients.publishers import CLIENTS, CODECS, Outgoing, publish
from tests.pipeline_support import committed_offsets, relay_settings, running_relay, wait_for_commit
from tests.tool_support import scm_relay

# Events per case: sizes (values per event) vary and their scm_data groups interleave, as
# a line's export does; the invalid one is dead-lettered.
EVENT_SIZES: Final = (1, 2, 5, 1, 8, 1, 3, 12, 1, 4)
CODES_PER_CASE: Final = sum(EVENT_SIZES)
MARKETS: Final = ("DE", "FR", "IT", "ES")
CODES_PER_CAMPAIGN: Final = 1000
# The relay's own output topics with the broker compressing them: the relay's ledger
# view and every tool then read compressed batches of another writer (the broker).
OUTPUT_CODECS: Final = {"results": "lz4", "dlq": "snappy", "tasks": "zstd"}
MARKER_BEGIN: Final = "<!-- codec-matrix:begin (written by tests/clients/codec_matrix.py) -->"
MARKER_END: Final = "<!-- codec-matrix:end -->"


@dataclass(frozen=True)
class Case:
    """One way of writing record batches."""

    client: str
    codec: str  # the producer's compression.type ("none": the topic's)
    transactional: bool
    topic_codec: str | None = None  # compression.type of the topic, when set

    @property
    def label(self) -> str:
        mode = "transactional" if self.transactional else "plain"
        where = f"topic {self.topic_codec}" if self.topic_codec else f"producer {self.codec}"
        return f"{self.client}, {where}, {mode}"


@dataclass
class Verdict:
    """What one case showed, judged from outside the relay."""

    case: Case
    codes: int = 0
    updated_once: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.problems and self.updated_once == self.codes


def producer_cases() -> list[Case]:
    """Every client x codec x transactional, the producer compressing."""
    return [
        Case(client, codec, transactional)
        for client in CLIENTS
        for codec in CODECS
        for transactional in (False, True)
    ]


def topic_cases(topic_codec: str) -> list[Case]:
    """Every client x transactional, uncompressed, into a topic that compresses."""
    return [
        Case(client, "none", transactional, topic_codec)
        for client in CLIENTS
        for transactional in (False, True)
    ]


def case_events(index: int) -> tuple[list[Outgoing], dict[str, str], bytes]:
    """The records of case `index` (its partition), the market each code must end with,
    and the value of its invalid record."""
    records: list[Outgoing] = []
    final: dict[str, str] = {}
    first = index * CODES_PER_CASE
    for n, size in enumerate(EVENT_SIZES):
        codes = [f"11X{first + sum(EVENT_SIZES[:n]) + i:06d}" for i in range(size)]
        market = MARKETS[n % len(MARKETS)]
        event = {
            "event_id": f"case{index}-{n}",
            "constraints": {"extended_id": codes if size > 1 else codes[0]},
            "scm_data": {"intended_market": market, "batch_number": f"B{n % 3}"},
        }
        records.append(Outgoing(index, codes[0].encode(), json.dumps(event).encode()))
        final.update(dict.fromkeys(codes, market))
    invalid = json.dumps(
        {
            "event_id": f"case{index}-bad",
            "constraints": {"extended_id": "x"},
            "scm_data": {"status": "1"},
        }
    ).encode()
    records.insert(len(records) // 2, Outgoing(index, b"bad", invalid))
    return records, final, invalid


async def make_relay_topics(
    factory: TopicFactory, partitions: int, topic_codec: str | None
) -> Topics:
    """The relay's topics; the outputs (and with `topic_codec` the input) compressed by
    the broker."""

    def compressed(codec: str | None) -> dict[str, str]:
        return {"compression.type": codec} if codec else {}

    tasks = await factory.create(
        "scm-tasks",
        partitions=partitions,
        config={
            "cleanup.policy": "compact",
            **compressed(topic_codec or OUTPUT_CODECS["tasks"]),
        },
    )
    return Topics(
        input=await factory.create(
            "scm-changes", partitions=partitions, config=compressed(topic_codec)
        ),
        results=await factory.create(
            "scm-results",
            partitions=partitions,
            config=compressed(topic_codec or OUTPUT_CODECS["results"]),
        ),
        dlq=await factory.create("scm-dlq", config=compressed(topic_codec or OUTPUT_CODECS["dlq"])),
        tasks=tasks,
        group=unique_name("relay"),
    )


def read_with_librdkafka(bootstrap: str, topic: str, timeout_s: float = 60) -> list[Any]:
    """Every committed record of `topic`, read by librdkafka (independent of the relay's
    aiokafka), as (partition, offset, value, headers)."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": unique_name("oracle"),
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "isolation.level": "read_committed",
            "enable.partition.eof": True,
        }
    )
    try:
        metadata = consumer.list_topics(topic, timeout=30)
        partitions = sorted(metadata.topics[topic].partitions)
        consumer.assign([TopicPartition(topic, p, 0) for p in partitions])
        open_partitions = set(partitions)
        found: list[Any] = []
        deadline = time.monotonic() + timeout_s
        while open_partitions and time.monotonic() < deadline:
            message = consumer.poll(0.5)
            if message is None:
                continue
            error = message.error()
            if error is not None:
                if error.code() == KafkaError._PARTITION_EOF:
                    open_partitions.discard(message.partition())
                    continue
                raise RuntimeError(f"librdkafka read of {topic} failed: {error}")
            headers = dict(message.headers() or [])
            found.append((message.partition(), message.offset(), message.value(), headers))
        if open_partitions:
            raise AssertionError(f"librdkafka did not reach the end of {topic}: {open_partitions}")
        return found
    finally:
        consumer.close()


async def run_cases(
    bootstrap: str, factory: TopicFactory, cases: list[Case], topic_codec: str | None = None
) -> tuple[list[Verdict], Topics, Any]:
    """Publish every case into a partition of its own, run one relay over them, judge each."""
    topics = await make_relay_topics(factory, len(cases), topic_codec)
    expected: list[tuple[dict[str, str], bytes]] = []
    for index, case in enumerate(cases):
        records, final, invalid = case_events(index)
        transactional_id = unique_name(f"publisher-{index}") if case.transactional else None
        await publish(
            case.client,
            bootstrap,
            topics.input,
            records,
            codec=case.codec,
            transactional_id=transactional_id,
        )
        expected.append((final, invalid))
    async with simulator(codes_per_campaign=CODES_PER_CAMPAIGN) as sim:
        settings = relay_settings(bootstrap, sim.base_url, topics)
        async with running_relay(settings) as relay:
            await wait_for_commit(bootstrap, topics, relay, timeout_s=180)
        verdicts = await _judge(bootstrap, topics, cases, expected, sim)
        return verdicts, topics, settings


async def _judge(
    bootstrap: str,
    topics: Topics,
    cases: list[Case],
    expected: list[tuple[dict[str, str], bytes]],
    sim: Simulator,
) -> list[Verdict]:
    inputs = await asyncio.to_thread(read_with_librdkafka, bootstrap, topics.input)
    letters = await asyncio.to_thread(read_with_librdkafka, bootstrap, topics.dlq)
    ends = await end_offsets(bootstrap, topics.input)
    committed = await committed_offsets(bootstrap, topics.group, topics.input)
    histories = {code.extended_id: code.history for code in sim.account.codes}
    dead = [
        (int(headers["scm_relay.source.partition"]), int(headers["scm_relay.source.offset"]))
        for _p, _o, _v, headers in letters
    ]
    verdicts = []
    for index, case in enumerate(cases):
        final, invalid = expected[index]
        verdict = Verdict(case, codes=len(final))
        for code, market in final.items():
            history = histories.get(code, [])
            if len(history) == 1 and history[0]["set"].get("intended_market") == market:
                verdict.updated_once += 1
            elif len(history) != 1:
                verdict.problems.append(f"{code} updated {len(history)} times")
        bad_at = [(p, o) for p, o, value, _h in inputs if p == index and value == invalid]
        mine = sorted(position for position in dead if position[0] == index)
        if len(bad_at) != 1 or mine != bad_at:
            verdict.problems.append(f"invalid record at {bad_at}, dead letters {mine}")
        if (committed.get(index) or 0) < ends[index]:
            verdict.problems.append(f"committed {committed.get(index)} of {ends[index]}")
        verdicts.append(verdict)
    return verdicts


async def tools_read(
    settings: Any, verdicts: list[Verdict], sim: Simulator | None = None
) -> list[str]:
    """Problems of `dlq list` and `tasks list` reading the relay's (compressed) topics."""
    problems = []
    listed = await scm_relay(settings, "dlq", "list", "--json", "--limit", "1000")
    if listed.code != 0:
        problems.append(f"dlq list exited {listed.code}: {listed.err[-500:]}")
    elif listed.json()["matched"] != len(verdicts):
        problems.append(
            f"dlq list found {listed.json()['matched']} of {len(verdicts)} dead letters"
        )
    tasks = await scm_relay(settings, "tasks", "list", "--json", "--limit", "1")
    if tasks.code != 0:
        problems.append(f"tasks list exited {tasks.code}: {tasks.err[-500:]}")
    elif tasks.json()["matched"] == 0:
        problems.append("tasks list found no task")
    return problems


# -- the table of docs/kafka-compatibility.md ------------------------------------------


def table(producer: list[Verdict], by_topic: dict[str, list[Verdict]], tools: list[str]) -> str:
    """The codec x client x transactional x topic-compression table, with its stamp."""
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    day = datetime.now(UTC).date().isoformat()
    import aiokafka
    import confluent_kafka

    lines = [
        MARKER_BEGIN,
        f"Measured on commit `{commit or 'unknown'}`, {day}: aiokafka {aiokafka.__version__}, "
        f"librdkafka {confluent_kafka.libversion()[0]}, Kafka's Java producer "
        f"(kafka-clients of the local broker). Each cell: the relay read the case's "
        f"records, updated each of its {CODES_PER_CASE} codes exactly once, dead-lettered "
        "its invalid record and committed its partition to the end (pass), or what went "
        "wrong.",
        "",
        "| codec | client | plain, producer compresses | transactional, producer compresses "
        "| plain, topic compresses | transactional, topic compresses |",
        "|---|---|---|---|---|---|",
    ]

    def cell(verdicts: list[Verdict], case: Case) -> str:
        for verdict in verdicts:
            if verdict.case == case:
                return "pass" if verdict.passed else "FAIL: " + "; ".join(verdict.problems[:2])
        return "not run"

    for codec in CODECS:
        for client in CLIENTS:
            topic = by_topic.get(codec, [])
            lines.append(
                f"| {codec} | {client} "
                f"| {cell(producer, Case(client, codec, False))} "
                f"| {cell(producer, Case(client, codec, True))} "
                f"| {cell(topic, Case(client, 'none', False, codec))} "
                f"| {cell(topic, Case(client, 'none', True, codec))} |"
            )
    lines += [
        "",
        "The relay's own output topics had the broker compress them (results "
        f"{OUTPUT_CODECS['results']}, dead letters {OUTPUT_CODECS['dlq']}, ledger "
        f"{OUTPUT_CODECS['tasks']}; in the topic-compression runs, the run's codec): the "
        "relay's ledger view, `scm-relay dlq list` and `scm-relay tasks list` read them: "
        + ("pass." if not tools else "FAIL: " + "; ".join(tools)),
        MARKER_END,
    ]
    return "\n".join(lines)


@contextmanager
def broker() -> Iterator[str]:
    """`SCM_RELAY_TEST_KAFKA`, or a broker of this run's own."""
    given = os.environ.get("SCM_RELAY_TEST_KAFKA", "").strip()
    if given:
        yield given
        return
    with tempfile.TemporaryDirectory(prefix="codec-matrix-") as run_dir:
        address = start_broker(Path(run_dir), show_output=True)
        try:
            yield address
        finally:
            stop_broker(Path(run_dir))


async def measure(bootstrap: str) -> str:
    """Run every case and return the table."""
    async with admin_client(bootstrap) as admin:
        factory = TopicFactory(admin)
        producer, _topics, settings = await run_cases(bootstrap, factory, producer_cases())
        tools = await tools_read(settings, producer)
        by_topic: dict[str, list[Verdict]] = {}
        for codec in CODECS:
            verdicts, _topics, settings = await run_cases(
                bootstrap, factory, topic_cases(codec), topic_codec=codec
            )
            by_topic[codec] = verdicts
            tools += [f"{codec} topics: {p}" for p in await tools_read(settings, verdicts)]
    return table(producer, by_topic, tools)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", type=Path, help="the markdown file whose table to replace")
    args = parser.parse_args()
    with broker() as bootstrap:
        measured = asyncio.run(measure(bootstrap))
    if args.write is None:
        print(measured)
        return 0
    text = args.write.read_text()
    if MARKER_BEGIN not in text or MARKER_END not in text:
        print(f"{args.write} has no codec-matrix markers", file=sys.stderr)
        return 2
    head, rest = text.split(MARKER_BEGIN, 1)
    _old, tail = rest.split(MARKER_END, 1)
    args.write.write_text(head + measured + tail)
    print(f"wrote the codec table to {args.write}")
    return 0 if "FAIL" not in measured else 1


if __name__ == "__main__":
    sys.exit(main())
