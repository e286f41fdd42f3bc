"""Kafka security: SASL (PLAIN, SCRAM-SHA-256/512) and TLS against a real broker.

A broker of this module's own is started with SASL_PLAINTEXT, SASL_SSL and SSL
listeners beside PLAINTEXT, trusting a CA made for this run. The test side sets up
topics and reads results over PLAINTEXT; the relay goes through the secure listener.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from collections.abc import AsyncIterator, Iterator, MutableMapping
from pathlib import Path
from typing import Any

import pytest
import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from pydantic import SecretStr

from devkit.harness import (
    RELAY_COMMAND,
    TopicFactory,
    admin_client,
    make_topics,
    relay_environment,
    unique_name,
)
from service.app import EXIT_CONFIG, EXIT_FAILED, run_relay
from service.kafka import KafkaSetupError, client_options, probe_connection
from service.settings import Settings, load_settings
from tests.api_support import FAST, simulator
from tests.pipeline_support import (
    event,
    publish,
    relay_settings,
    results,
    running_relay,
    wait_for_commit,
)
from tests.secure_kafka_support import PASSWORD, USER, SecureBroker, secure_broker

pytestmark = pytest.mark.kafka


@pytest.fixture(scope="module")
def broker(kafka_broker: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureBroker]:
    # kafka_broker: the session broker's jars are resolved before this one starts.
    with secure_broker(tmp_path_factory.mktemp("secure-kafka")) as started:
        yield started


@pytest.fixture
async def plain_topics(broker: SecureBroker) -> AsyncIterator[TopicFactory]:
    async with admin_client(broker.listeners["PLAINTEXT"]) as admin:
        yield TopicFactory(admin)


def security(broker: SecureBroker, protocol: str, **extra: Any) -> dict[str, Any]:
    """Settings fields for connecting through `protocol` as the test user."""
    fields: dict[str, Any] = {
        "kafka_bootstrap_servers": broker.listeners[protocol],
        "kafka_security_protocol": protocol,
    }
    if protocol.startswith("SASL_"):
        fields |= {"kafka_sasl_username": USER, "kafka_sasl_password": PASSWORD}
    if protocol in ("SSL", "SASL_SSL"):
        fields["kafka_ssl_cafile"] = broker.certificates.ca
    return fields | extra


CONNECTIONS = [
    # PLAIN in clear text only with the setting that allows it (a test broker on loopback).
    pytest.param(
        "SASL_PLAINTEXT",
        {"kafka_sasl_mechanism": "PLAIN", "kafka_allow_plaintext_sasl": True},
        id="sasl-plaintext-plain",
    ),
    pytest.param(
        "SASL_PLAINTEXT", {"kafka_sasl_mechanism": "SCRAM-SHA-256"}, id="sasl-plaintext-scram256"
    ),
    pytest.param(
        "SASL_PLAINTEXT", {"kafka_sasl_mechanism": "SCRAM-SHA-512"}, id="sasl-plaintext-scram512"
    ),
    pytest.param("SASL_SSL", {"kafka_sasl_mechanism": "PLAIN"}, id="sasl-ssl-plain"),
    pytest.param("SASL_SSL", {"kafka_sasl_mechanism": "SCRAM-SHA-256"}, id="sasl-ssl-scram256"),
    pytest.param("SASL_SSL", {"kafka_sasl_mechanism": "SCRAM-SHA-512"}, id="sasl-ssl-scram512"),
    pytest.param("SSL", {}, id="ssl-ca-only"),
    pytest.param("SSL", {"client_cert": True}, id="ssl-client-certificate"),
]


@pytest.mark.parametrize(("protocol", "extra"), CONNECTIONS)
async def test_every_client_the_relay_builds_works_through_each_secure_listener(
    broker: SecureBroker, plain_topics: TopicFactory, protocol: str, extra: dict[str, Any]
) -> None:
    fields = dict(extra)
    if fields.pop("client_cert", False):
        fields |= {
            "kafka_ssl_certfile": broker.certificates.client_cert,
            "kafka_ssl_keyfile": broker.certificates.client_key,
        }
    settings = load_settings({}, **security(broker, protocol, **fields))
    kafka = settings.kafka
    options = client_options(kafka)
    await probe_connection(kafka, options)
    topic = await plain_topics.create("secure")

    admin = AIOKafkaAdminClient(**options)
    await admin.start()
    try:
        assert topic in await admin.list_topics()
    finally:
        await admin.close()
    producer = AIOKafkaProducer(
        transactional_id=unique_name("secure-tx"), enable_idempotence=True, **options
    )
    await producer.start()
    try:
        async with producer.transaction():
            await producer.send(topic, b"through " + protocol.encode())
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(
        topic,
        group_id=unique_name("secure-group"),
        auto_offset_reset="earliest",
        isolation_level="read_committed",
        **options,
    )
    await consumer.start()
    try:
        record = await asyncio.wait_for(consumer.getone(), timeout=30)
        await consumer.commit()
    finally:
        await consumer.stop()
    assert record.value == b"through " + protocol.encode()


async def test_the_relay_consumes_and_produces_through_sasl_ssl_scram(
    broker: SecureBroker, plain_topics: TopicFactory
) -> None:
    plaintext = broker.listeners["PLAINTEXT"]
    topics = await make_topics(plain_topics, partitions=2)
    events = [
        event([f"11X{n:06d}"], scm_data={"intended_market": "DE"}, event_id=f"s{n}")
        for n in range(20)
    ]
    async with simulator(FAST) as sim:
        settings = relay_settings(
            plaintext,
            sim.base_url,
            topics,
            **security(broker, "SASL_SSL", kafka_sasl_mechanism="SCRAM-SHA-512"),
        )
        await publish(plaintext, topics.input, events)
        async with running_relay(settings) as relay:
            await wait_for_commit(plaintext, topics, relay)
            outcomes = await results(plaintext, topics.results, sim.account.stats.uploads_accepted)
    assert sum(outcome["codes_affected"] for outcome in outcomes) == 20
    assert all(outcome["state"] == "complete" and not outcome["short"] for outcome in outcomes)


async def relay_exit(settings: Settings) -> tuple[int, float, list[MutableMapping[str, Any]]]:
    """Run the relay to its exit; return the code, the seconds it took and its logs."""
    started = time.monotonic()
    with structlog.testing.capture_logs() as logs:
        code = await asyncio.wait_for(run_relay(settings, asyncio.Event()), timeout=60)
    return code, time.monotonic() - started, logs


def problem(logs: list[MutableMapping[str, Any]], event_name: str) -> str:
    return next(str(entry.get("problem")) for entry in logs if entry["event"] == event_name)


REFUSED = [
    pytest.param(
        "SASL_SSL",
        {"kafka_sasl_mechanism": "PLAIN", "kafka_sasl_password": "wrong-pw"},
        ["refused the SASL credentials", "SCM_RELAY_KAFKA_SASL_PASSWORD"],
        id="wrong-password-plain",
    ),
    pytest.param(
        "SASL_SSL",
        {"kafka_sasl_mechanism": "SCRAM-SHA-256", "kafka_sasl_password": "wrong-pw"},
        ["refused the SASL credentials", "SCM_RELAY_KAFKA_SASL_PASSWORD"],
        id="wrong-password-scram",
    ),
    pytest.param(
        "SSL",
        {"other_ca": True},
        ["not trusted", "SCM_RELAY_KAFKA_SSL_CAFILE"],
        id="untrusted-broker-certificate",
    ),
    pytest.param(
        "SASL_PLAINTEXT",
        {"kafka_sasl_mechanism": "SCRAM-SHA-256", "listener": "PLAINTEXT"},
        ["not a SASL listener", "SCM_RELAY_KAFKA_SECURITY_PROTOCOL"],
        id="sasl-against-a-plaintext-listener",
    ),
]


@pytest.mark.parametrize(("protocol", "fields", "expected"), REFUSED)
async def test_a_refused_connection_stops_the_relay_at_start_naming_the_setting(
    broker: SecureBroker,
    plain_topics: TopicFactory,
    protocol: str,
    fields: dict[str, Any],
    expected: list[str],
) -> None:
    fields = dict(fields)
    if fields.pop("other_ca", False):
        fields["kafka_ssl_cafile"] = broker.certificates.other_ca
    if listener := fields.pop("listener", None):
        fields["kafka_bootstrap_servers"] = broker.listeners[listener]
    topics = await make_topics(plain_topics)
    settings = relay_settings(
        broker.listeners["PLAINTEXT"],
        "http://127.0.0.1:9",
        topics,
        **security(broker, protocol, **fields),
    )
    code, seconds, logs = await relay_exit(settings)
    assert code == EXIT_CONFIG
    assert seconds < 30, "a refused connection must fail fast, not retry until a timeout"
    message = problem(logs, "kafka_setup_invalid")
    for fragment in expected:
        assert fragment in message
    assert "wrong-pw" not in message, "the password must never be logged"


def test_the_relay_process_prints_no_secret_when_kafka_refuses_it(
    broker: SecureBroker, tmp_path: Path
) -> None:
    # The relay as its own process (every logger, the console and JSON formats as
    # deployed) logs in to a SASL listener with a password the broker refuses: the SASL
    # exchange runs, the broker answers, the process stops naming the setting. Nothing it
    # prints may hold the password it sent or the API token.
    password = "sasl-p4ss-w0rd-42"
    token = "uat-7f3c9a1e5b2d4c6e"
    environment = relay_environment(
        {
            "api_token": f"{token}\n",
            "kafka_bootstrap_servers": broker.listeners["SASL_PLAINTEXT"],
            "kafka_security_protocol": "SASL_PLAINTEXT",
            "kafka_sasl_mechanism": "PLAIN",
            "kafka_sasl_username": USER,
            "kafka_sasl_password": password,
            "kafka_allow_plaintext_sasl": "true",
            "log_level": "DEBUG",
        }
    )
    finished = subprocess.run(
        RELAY_COMMAND,
        env=environment,
        capture_output=True,
        timeout=60,
        check=False,
        cwd=tmp_path,
    )
    output = finished.stdout + finished.stderr
    assert finished.returncode == EXIT_CONFIG, output.decode(errors="replace")
    assert b"kafka_setup_invalid" in output
    assert b"refused the SASL credentials" in output, "the broker's SASL refusal was not seen"
    assert password.encode() not in output
    assert token.encode() not in output


async def test_no_listener_at_all_exits_as_unavailable_after_the_startup_wait() -> None:
    settings = load_settings(
        {},
        kafka_bootstrap_servers="127.0.0.1:1",
        api_token=SecretStr("t"),
        kafka_startup_wait_s=3,
    )
    code, seconds, logs = await relay_exit(settings)
    assert code == EXIT_FAILED
    assert seconds >= 3, "a broker that is down is waited for, within the setting"
    message = problem(logs, "kafka_unavailable")
    assert "after waiting 3 s" in message
    assert "127.0.0.1:1" in message
    assert "SCM_RELAY_KAFKA_BOOTSTRAP_SERVERS" in message
    assert [entry for entry in logs if entry["event"] == "kafka_waiting"]


def test_an_unreadable_ca_file_names_the_setting(tmp_path: Path) -> None:
    bogus = tmp_path / "ca.pem"
    bogus.write_text("not a certificate")
    settings = load_settings(
        {}, kafka_security_protocol="SSL", kafka_ssl_cafile=bogus, api_token=SecretStr("t")
    )
    with pytest.raises(KafkaSetupError, match="SCM_RELAY_KAFKA_SSL_CAFILE"):
        client_options(settings.kafka)


async def test_a_rotated_password_file_reaches_the_clients_already_built(
    broker: SecureBroker, tmp_path: Path
) -> None:
    """Clients built while the file held a stale password connect once it holds the
    right one: the watcher gives the new password to their next connections."""

    from service.kafka import watch_sasl_password

    password_file = tmp_path / "kafka-password"
    password_file.write_text("stale-password\n")
    settings = load_settings(
        {},
        **(
            security(broker, "SASL_SSL", kafka_sasl_mechanism="SCRAM-SHA-512")
            | {"kafka_sasl_password": None, "kafka_sasl_password_file": password_file}
        ),
    )
    kafka = settings.kafka
    options = client_options(kafka)
    producer = AIOKafkaProducer(**options)
    admin = AIOKafkaAdminClient(**options)
    changed = asyncio.Event()

    class Clients(list[Any]):
        def __iter__(self) -> Any:
            changed.set()  # the watcher hands the new password over now
            return super().__iter__()

    watcher = asyncio.create_task(
        watch_sasl_password(kafka, options, Clients([producer, admin]), every_s=0.05)
    )
    try:
        password_file.write_text(f"{PASSWORD}\n")
        later = password_file.stat().st_mtime_ns + 1_000_000_000
        os.utime(password_file, ns=(later, later))
        await asyncio.wait_for(changed.wait(), timeout=10)
    finally:
        watcher.cancel()
    assert options["sasl_plain_password"] == PASSWORD
    await producer.start()
    try:
        await admin.start()
        try:
            assert isinstance(await admin.list_topics(), list)
        finally:
            await admin.close()
    finally:
        await producer.stop()
