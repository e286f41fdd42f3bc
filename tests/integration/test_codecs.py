"""Records from any producer: every codec Kafka defines, from aiokafka, librdkafka and
Kafka's Java producer, in transactions or not, compressed by the producer or by the
topic; and a record batch nobody can decode, which stops its partition only.

Each case is judged from outside the relay (tests/clients/codec_matrix.py): the
simulator's codes, the dead letters and the input read back with librdkafka, and the
group's committed offsets.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from devkit.harness import TopicFactory, end_offsets, make_topics, relay_process, wait_until
from service.http import free_port
from service.kafka import readable_codecs
from tests.api_support import simulator
from tests.clients.codec_matrix import (
    producer_cases,
    run_cases,
    tools_read,
    topic_cases,
)
from tests.clients.publishers import CODECS, Outgoing, publish
from tests.pipeline_support import committed_offsets, relay_settings, running_relay

pytestmark = pytest.mark.kafka


def test_this_installation_reads_every_codec_kafka_defines() -> None:
    assert readable_codecs() == dict.fromkeys(CODECS, True)


@pytest.mark.timeout(600)
async def test_every_client_and_codec_transactional_or_not_is_read_once(
    kafka_bootstrap: str, topic_factory: TopicFactory
) -> None:
    verdicts, _topics, settings = await run_cases(kafka_bootstrap, topic_factory, producer_cases())
    failed = {v.case.label: v.problems for v in verdicts if not v.passed}
    assert failed == {}
    assert await tools_read(settings, verdicts) == []


@pytest.mark.timeout(600)
@pytest.mark.parametrize("codec", CODECS)
async def test_a_topic_that_compresses_is_read_by_the_relay_and_the_tools(
    kafka_bootstrap: str, topic_factory: TopicFactory, codec: str
) -> None:
    verdicts, _topics, settings = await run_cases(
        kafka_bootstrap, topic_factory, topic_cases(codec), topic_codec=codec
    )
    failed = {v.case.label: v.problems for v in verdicts if not v.passed}
    assert failed == {}
    assert await tools_read(settings, verdicts) == []


# -- a record batch that cannot be decoded ----------------------------------------------

# Run the relay as `python -m service run` with cramjam unimportable: what an
# installation without aiokafka's codec extras is (the crash loop the issue measured).
WITHOUT_CRAMJAM = (
    "import sys; sys.modules['cramjam'] = None; "
    "from service.cli import main; sys.exit(main(['run']))"
)


def change(code: str, market: str) -> bytes:
    return json.dumps(
        {"constraints": {"extended_id": code}, "scm_data": {"intended_market": market}}
    ).encode()


async def readiness(port: int) -> tuple[int, Any]:
    url = f"http://127.0.0.1:{port}/readyz"
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return response.status, await response.json()


@pytest.mark.timeout(300)
async def test_a_partition_of_records_it_cannot_decode_stops_alone_and_nothing_passes_it(
    kafka_bootstrap: str, topic_factory: TopicFactory, tmp_path: Path
) -> None:
    """Partition 0 holds plain records, then zstd ones, then plain ones again; partition 1
    plain ones. A relay without the zstd codec takes partition 0 up to the zstd batch and
    no further (its commit point is exactly that batch), all of partition 1, stays alive,
    says which partition stopped in /readyz, a metric and a log line."""
    topics = await make_topics(topic_factory, partitions=2)
    before = [Outgoing(0, None, change(f"11X{n:06d}", "DE")) for n in range(5)]
    zstd = [Outgoing(0, None, change(f"11X{n:06d}", "FR")) for n in range(5, 10)]
    after = [Outgoing(0, None, change(f"11X{n:06d}", "IT")) for n in range(10, 15)]
    other = [Outgoing(1, None, change(f"11X{n:06d}", "ES")) for n in range(20, 30)]
    for record in before:  # one batch each: records before the bad batch in other batches
        await publish("aiokafka", kafka_bootstrap, topics.input, [record], codec="none")
    await publish("librdkafka", kafka_bootstrap, topics.input, zstd, codec="zstd")
    await publish("aiokafka", kafka_bootstrap, topics.input, after, codec="none")
    await publish("aiokafka", kafka_bootstrap, topics.input, other, codec="gzip")
    async with simulator(codes_per_campaign=100) as sim:
        port = free_port()
        settings = relay_settings(kafka_bootstrap, sim.base_url, topics, http_port=port)
        log = tmp_path / "relay.log"
        async with relay_process(
            settings, log, command=(sys.executable, "-c", WITHOUT_CRAMJAM)
        ) as process:

            async def partition_one_done() -> bool:
                assert process.returncode is None, log.read_text()[-3000:]
                committed = await committed_offsets(kafka_bootstrap, topics.group, topics.input)
                return (committed.get(1) or 0) >= 10 and (committed.get(0) or 0) >= 5

            await wait_until(
                partition_one_done, what="the readable records committed", timeout_s=120
            )
            await asyncio.sleep(3)  # time to run past the batch, were it to
            assert process.returncode is None, "the relay exited"
            committed = await committed_offsets(kafka_bootstrap, topics.group, topics.input)
            status, body = await readiness(port)
            metrics = await _metrics(port)
        histories = {c.extended_id: c.history for c in sim.account.codes}
    assert committed[0] == 5, "committed past (or short of) the batch it cannot decode"
    assert committed[1] == (await end_offsets(kafka_bootstrap, topics.input))[1]
    updated = {code for code, history in histories.items() if history}
    assert updated == {f"11X{n:06d}" for n in [*range(5), *range(20, 30)]}
    assert status == 503
    assert any(
        f"input partition {topics.input}:0 stopped at offset 5" in reason and "zstd" in reason
        for reason in body["reasons"]
    ), body
    assert f'scm_relay_partition_stopped{{partition="0",topic="{topics.input}"}} 1.0' in metrics
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    stops = [line for line in lines if line.get("event") == "partition_stopped_undecodable"]
    assert len(stops) == 1, stops
    assert (stops[0]["partition"], stops[0]["offset"]) == (0, 5)


async def _metrics(port: int) -> str:
    url = f"http://127.0.0.1:{port}/metrics"
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return await response.text()


async def segment_of(admin: AIOKafkaAdminClient, topic: str, partition: int) -> Path:
    """The first log segment of a partition of the (local) broker."""
    cluster = await admin.describe_cluster()
    node = str(cluster["brokers"][0]["node_id"])
    (described,) = await admin.describe_configs([ConfigResource(ConfigResourceType.BROKER, node)])
    entries = {entry[0]: entry[1] for entry in described.resources[0][4]}
    for log_dir in (entries.get("log.dirs") or entries.get("log.dir") or "").split(","):
        segment = Path(log_dir) / f"{topic}-{partition}" / f"{0:020d}.log"
        if segment.exists():
            return segment
    raise AssertionError(f"no segment of {topic}-{partition} under {entries.get('log.dirs')}")


def corrupt_batch(segment: Path, base_offset: int) -> None:
    """Flip the last byte of the record batch starting at `base_offset` (its CRC no longer
    matches), in place: the broker serves the segment's bytes as they are."""
    data = bytearray(segment.read_bytes())
    position = 0
    while position + 12 <= len(data):
        offset = int.from_bytes(data[position : position + 8], "big")
        length = int.from_bytes(data[position + 8 : position + 12], "big")
        end = position + 12 + length
        if offset == base_offset:
            with segment.open("r+b") as file:
                file.seek(end - 1)
                file.write(bytes([data[end - 1] ^ 0xFF]))
            return
        position = end
    raise AssertionError(f"no batch at offset {base_offset} in {segment}")


@pytest.mark.timeout(300)
async def test_a_corrupt_batch_on_the_broker_stops_its_partition_exactly_there(
    kafka_bootstrap: str, topic_factory: TopicFactory
) -> None:
    """A record batch whose CRC does not match (a damaged log segment) stops its partition
    at that batch: every record before it is taken and committed, nothing at or after it,
    the other partition goes on, and the relay stays up and says so."""
    topics = await make_topics(topic_factory, partitions=2)
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    await producer.start()
    try:
        for n in range(20):  # offsets 0..19 of partition 0, one batch each
            await producer.send_and_wait(topics.input, change(f"11X{n:06d}", "DE"), partition=0)
        for n in range(20, 30):
            await producer.send_and_wait(topics.input, change(f"11X{n:06d}", "FR"), partition=1)
    finally:
        await producer.stop()
    admin = topic_factory.admin
    corrupt_batch(await segment_of(admin, topics.input, 0), base_offset=10)
    async with simulator(codes_per_campaign=100) as sim:
        port = free_port()
        settings = relay_settings(kafka_bootstrap, sim.base_url, topics, http_port=port)
        async with running_relay(settings) as relay:

            async def readable_done() -> bool:
                relay.check_alive()
                committed = await committed_offsets(kafka_bootstrap, topics.group, topics.input)
                return (committed.get(0) or 0) >= 10 and (committed.get(1) or 0) >= 10

            await wait_until(readable_done, what="the readable records committed", timeout_s=120)
            await asyncio.sleep(3)
            relay.check_alive()
            committed = await committed_offsets(kafka_bootstrap, topics.group, topics.input)
            status, body = await readiness(port)
        updated = {c.extended_id for c in sim.account.codes if c.history}
    assert committed == {0: 10, 1: 10}
    assert updated == {f"11X{n:06d}" for n in [*range(10), *range(20, 30)]}
    assert status == 503
    assert any(
        f"input partition {topics.input}:0 stopped at offset 10" in reason
        and "CorruptRecordException" in reason
        for reason in body["reasons"]
    ), body
