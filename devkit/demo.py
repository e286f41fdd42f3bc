"""`scm-relay demo`: the whole job, locally, in one command, ending with a summary.

Starts its own Kafka broker (the source checkout's `deploy/local-kafka`) and the API
simulator, both on loopback. Then it starts the relay, publishes a mix of sample
events from several production lines (with a few invalid records, a few codes
Scantrust does not know, and one line whose task fails), waits for every result,
prints a summary and stops everything it started.

It never reads the relay's SCM_RELAY_* settings: run where a production relay is
configured, it must not publish sample updates to the real API or create topics on
the real cluster. Part of the development kit, left out of the production wheel.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Final

from aiokafka import AIOKafkaProducer
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource

from devkit.harness import (
    KAFKA_LOCAL,
    BrokerError,
    TopicFactory,
    Topics,
    admin_client,
    committed_reader,
    local_broker,
    make_topics,
)
from devkit.simulator.app import running_simulator
from devkit.simulator.seed import default_seed
from devkit.simulator.state import Account, Faults
from service.app import run_relay
from service.core.reasons import Reason
from service.core.records import HEADER_REASON, INTENT_KEY_PREFIX, PROGRESS_KEY_PREFIX
from service.http import free_port
from service.logs import configure_logging
from service.settings import Settings

# What the broker script may take from the environment: where its jars come from and
# go, its heap and start-up wait. Not its host, listeners or nodes: the demo's broker is
# one plain node on loopback whatever the environment says.
BROKER_SCRIPT_SETTINGS: Final = frozenset(
    {
        "SCM_RELAY_KAFKA_JARS_DIR",
        "SCM_RELAY_MAVEN_REPO",
        "SCM_RELAY_KAFKA_HEAP",
        "SCM_RELAY_KAFKA_START_TIMEOUT",
    }
)
DEMO_TOKEN: Final = "demo-token"  # noqa: S105 - the simulator's token, local only
FAILING_LINE: Final = "line-9 rework"
WAIT_LIMIT_S: Final = 240.0


@dataclass
class DemoSummary:
    """What the demo saw: printed as a table, checked by the tests."""

    events_published: int = 0
    invalid_published: int = 0
    tasks: Counter[str] = field(default_factory=Counter)
    short_tasks: list[dict[str, Any]] = field(default_factory=list)
    codes_affected: int = 0
    codes_expected: int = 0
    dead_letters: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0
    metrics_url: str | None = None
    replayed: dict[str, Any] | None = None  # the result of the dead letter fixed and replayed

    def table(self) -> str:
        """A readable summary."""
        lines = [
            "",
            "scm-relay demo: summary",
            "-----------------------",
            f"events published      {self.events_published} ({self.invalid_published} invalid)",
            f"tasks                 {sum(self.tasks.values())}: "
            + ", ".join(f"{state} {count}" for state, count in sorted(self.tasks.items())),
            f"codes affected        {self.codes_affected} of {self.codes_expected} expected",
            f"short tasks           {len(self.short_tasks)}",
        ]
        lines += [
            f"  {s['task_id']}  {s['reference'] or '-'}: {s['codes_affected']} of "
            f"{s['expected_codes']} codes, {s['shortfall']} missing"
            for s in self.short_tasks
        ]
        lines.append(
            "dead letters          "
            + (", ".join(f"{r} {n}" for r, n in sorted(self.dead_letters.items())) or "none")
        )
        if self.replayed is not None:
            lines.append(
                f"replayed              1 dead letter fixed, its task "
                f"{self.replayed['task_id']} {self.replayed['state']}"
            )
        lines.append(f"time taken            {self.seconds:.1f} s")
        if self.metrics_url:
            lines.append(f"metrics               {self.metrics_url} (while the demo ran)")
        return "\n".join(lines)


def sample_events(lines: int, codes_per_line: int) -> tuple[list[bytes], int]:
    """Events from several production lines, plus invalid records; returns (values, invalid)."""
    events: list[dict[str, Any]] = []
    for line in range(lines):
        campaign = 11 if line % 2 == 0 else 12
        market = ("DE", "FR", "IT", "ES")[line % 4]
        reference = f"line-{line + 1} shift B"
        for start in range(0, codes_per_line, 25):
            first = line * codes_per_line + start
            codes = [f"{campaign}X{n:06d}" for n in range(first, first + 25)]
            events.append(
                {
                    "event_id": f"mes-{line + 1}-{first:06d}",
                    "constraints": {"extended_id": codes},
                    "scm_data": {"production_date": "2026-11-27", "intended_market": market},
                    "campaign": campaign,
                    "reference": reference,
                }
            )
    # Codes Scantrust does not know: their task touches fewer codes than it was sent.
    events.append(
        {
            "event_id": "mes-7-unknown",
            "constraints": {
                "extended_id": ["11X000000", "11X000001", "NOT-A-CODE-1", "NOT-A-CODE-2"]
            },
            "scm_data": {"batch_number": "B-77"},
            "reference": "line-7 relabel",
        }
    )
    # A line whose task the simulator fails.
    events.append(
        {
            "event_id": "mes-9-000001",
            "constraints": {"serial_number": ["SN12-000010", "SN12-000011"]},
            "scm_data": {"lot": "L-9"},
            "reference": FAILING_LINE,
        }
    )
    invalid: list[bytes] = [
        b'{"constraints": {"extended_id": ["11X000002"]}, "scm_data": {"status": "1"}}',
        b'{"constraints": {"extended_id": ["11X000003"]}, "scm_data": {"lot": "1"}, '
        b'"campaign": "11"}',
        b"this is not JSON",
    ]
    return [json.dumps(e).encode() for e in events] + invalid, len(invalid)


class DemoUnavailableError(RuntimeError):
    """What the demo needs and this machine lacks, said so that it can be fixed."""


def check_broker_script() -> None:
    """Say what the local broker needs and this machine lacks, if anything."""
    if shutil.which("java") is None:
        raise DemoUnavailableError(
            "the demo's local Kafka broker needs Java 17 or newer (`java` on PATH)"
        )
    if shutil.which("bash") is None:
        raise DemoUnavailableError("the local broker script needs bash")
    if not KAFKA_LOCAL.exists():
        raise DemoUnavailableError(
            f"no local broker script ({KAFKA_LOCAL} is missing): the demo runs from "
            "a source checkout (`make demo`)"
        )


def broker_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """`environ` without the SCM_RELAY_* settings but the broker script's own knobs."""
    env = {
        name: value
        for name, value in environ.items()
        if not name.startswith("SCM_RELAY_") or name in BROKER_SCRIPT_SETTINGS
    }
    # A run dir of its own: `kafka-local start` replaces the broker of its run dir, and
    # the default one is the test suite's.
    env["SCM_RELAY_KAFKA_RUN_DIR"] = str(KAFKA_LOCAL.parent / ".run-demo")
    return env


@asynccontextmanager
async def demo_broker(environ: Mapping[str, str]) -> AsyncIterator[str]:
    """Start the source checkout's local broker, its messages shown; yields its address."""
    check_broker_script()
    try:
        async with local_broker(
            None, base=broker_environment(environ), show_output=True
        ) as address:
            yield address
    except BrokerError as exc:
        raise DemoUnavailableError(str(exc)) from exc


class _ArgumentsOnly(Settings):
    """Settings from the constructor's arguments alone: no environment variable, no
    SCM_RELAY_CONFIG file, no token or password file they would name."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        *others: PydanticBaseSettingsSource,
        **named: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings,)


def demo_settings(bootstrap: str, api_url: str, run: str, metrics_port: int) -> Settings:
    """The demo relay's settings: its own broker and simulator, and nothing from the
    environment (a production pod's SCM_RELAY_* variables, token file or SASL password
    included)."""
    return _ArgumentsOnly.model_validate(
        {
            "kafka_bootstrap_servers": bootstrap,
            "kafka_group_id": f"scm-relay-demo-{run}",
            "input_topic": f"scm.changes.demo-{run}",
            "results_topic": f"scm.results.demo-{run}",
            "dlq_topic": f"scm.dlq.demo-{run}",
            "tasks_topic": f"scm.tasks.demo-{run}",
            "api_base_url": api_url,
            "api_token": DEMO_TOKEN,
            "batch_linger_ms": 300,
            "poll_initial_s": 0.5,
            "poll_max_s": 2.0,
            "http_host": "127.0.0.1",
            "http_port": metrics_port,
        }
    )


async def run_demo(
    environ: Mapping[str, str],
    *,
    lines: int = 4,
    codes_per_line: int = 500,
    bootstrap: str | None = None,
) -> DemoSummary:
    """Run the demo. `environ` gives only the broker script's own knobs and PATH; the
    tests pass `bootstrap`, the broker they already run (the command never does)."""
    started = time.monotonic()
    summary = DemoSummary()
    async with AsyncExitStack() as stack:
        if bootstrap is None:
            bootstrap = await stack.enter_async_context(demo_broker(environ))
        seed = default_seed(max(2500, lines * codes_per_line))
        account = Account(seed, Faults(fail_reference=FAILING_LINE))
        api_url = await stack.enter_async_context(running_simulator(account, DEMO_TOKEN))
        print(f"simulator (not Scantrust) on {api_url}", file=sys.stderr)
        run = uuid.uuid4().hex[:8]
        metrics_port = free_port()
        summary.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        print(f"relay metrics on {summary.metrics_url} while the demo runs", file=sys.stderr)
        settings = demo_settings(bootstrap, api_url, run, metrics_port)
        topics = Topics(
            input=settings.kafka.input_topic,
            results=settings.kafka.results_topic,
            dlq=settings.kafka.dlq_topic,
            tasks=settings.kafka.tasks_topic,
            group=settings.kafka.group_id,
        )
        async with admin_client(bootstrap) as admin:
            await make_topics(TopicFactory(admin), partitions=3, topics=topics)
        records, summary.invalid_published = sample_events(lines, codes_per_line)
        summary.events_published = len(records)
        stop = asyncio.Event()
        relay = asyncio.create_task(run_relay(settings, stop))
        try:
            await _publish(bootstrap, topics.input, records)
            await _wait_for_results(bootstrap, topics, summary, relay)
            await _fix_and_replay(settings, summary)
        finally:
            stop.set()
            await asyncio.wait_for(relay, timeout=60)
    summary.seconds = time.monotonic() - started
    return summary


async def _publish(bootstrap: str, topic: str, records: list[bytes]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for number, record in enumerate(records):
            await producer.send(topic, record, key=str(number % 7).encode())
        await producer.flush()
    finally:
        await producer.stop()


async def _wait_for_results(
    bootstrap: str, topics: Topics, summary: DemoSummary, relay: asyncio.Task[int]
) -> None:
    """Read results and dead letters until every recorded task has its result."""
    readers = {
        name: committed_reader(bootstrap, topic)
        for name, topic in (
            ("results", topics.results),
            ("dlq", topics.dlq),
            ("tasks", topics.tasks),
        )
    }
    for reader in readers.values():
        await reader.start()
    try:
        finished: dict[str, dict[str, Any]] = {}
        recorded: set[str] = set()
        deadline = time.monotonic() + WAIT_LIMIT_S
        quiet_since = time.monotonic()
        while time.monotonic() < deadline:
            if relay.done():
                raise RuntimeError(f"the relay stopped early with exit code {relay.result()}")
            got = False
            for name, reader in readers.items():
                for records in (await reader.getmany(timeout_ms=100)).values():
                    got = got or bool(records)
                    for record in records:
                        _take(name, record, finished, recorded, summary)
            if got:
                quiet_since = time.monotonic()
            settled = (
                recorded
                and recorded <= set(finished)
                and sum(summary.dead_letters.values()) >= summary.invalid_published
            )
            if settled and time.monotonic() - quiet_since > 2.0:
                break
        for outcome in finished.values():
            summary.tasks[outcome["state"]] += 1
            summary.codes_affected += outcome["codes_affected"] or 0
            summary.codes_expected += outcome["expected_codes"] or 0
            if outcome["short"]:
                summary.short_tasks.append(outcome)
    finally:
        for reader in readers.values():
            await reader.stop()


FIXED_EVENT_ID: Final = "mes-2-status-fixed"


async def _fix_and_replay(settings: Settings, summary: DemoSummary) -> None:
    """What an operator does with the `status` dead letter: fix it (the key is
    `activation_status`), replay it (`scm-relay dlq replay --fixed`), and follow its
    task (`scm-relay tasks show`). The tools' own code runs, printing what they print."""
    from service.tools.dlq import Replay, Selection, read_dead_letters
    from service.tools.output import Printer
    from service.tools.tasks import show

    letter = None
    async for candidate in read_dead_letters(settings, settings.kafka.dlq_topic):
        if candidate.headers.reason is Reason.SCM_DATA_KEY_STATUS:
            letter = candidate
    if letter is None:
        return
    event = json.loads(letter.value)
    event["scm_data"] = {"activation_status": event["scm_data"]["status"]}
    event["event_id"] = FIXED_EVENT_ID
    position = (letter.partition, letter.offset)
    print(f"\n$ cat fix.jsonl\n{json.dumps({'offset': letter.offset, 'event': event})}")
    print("$ scm-relay dlq replay --fixed fix.jsonl")
    printer = Printer(as_json=False)
    replay = Replay(
        settings=settings,
        selection=Selection(offsets=(letter.partition, letter.offset, letter.offset)),
        fixed={position: json.dumps(event).encode()},
        limits=settings.limits,
    )
    await replay.run(printer)
    result = await _result_carrying(settings, FIXED_EVENT_ID)
    summary.replayed = result
    summary.tasks[result["state"]] += 1
    summary.codes_affected += result["codes_affected"] or 0
    summary.codes_expected += result["expected_codes"] or 0
    print(f"\n$ scm-relay tasks show {result['task_id']}")
    await show(settings, result["task_id"], printer)


async def _result_carrying(settings: Settings, event_id: str) -> dict[str, Any]:
    """The result of the task that carried `event_id` (waits up to WAIT_LIMIT_S)."""
    reader = committed_reader(settings.kafka.bootstrap_servers, settings.kafka.results_topic)
    await reader.start()
    try:
        async with asyncio.timeout(WAIT_LIMIT_S):
            while True:
                for records in (await reader.getmany(timeout_ms=500)).values():
                    for record in records:
                        value = json.loads(record.value)
                        carried = {e.get("event_id") for e in value.get("events", [])}
                        if value.get("kind") == "result" and event_id in carried:
                            return dict(value)
    finally:
        await reader.stop()


def _take(
    name: str,
    record: Any,
    finished: dict[str, dict[str, Any]],
    recorded: set[str],
    summary: DemoSummary,
) -> None:
    if name == "tasks" and record.value is not None:
        key = record.key.decode()
        if not key.startswith((INTENT_KEY_PREFIX, PROGRESS_KEY_PREFIX)):  # not tasks
            recorded.add(key)
    elif name == "results":
        value = json.loads(record.value)
        if value.get("kind") == "result":
            finished[value["task_id"]] = value
    elif name == "dlq":
        reason = dict(record.headers).get(HEADER_REASON, b"?").decode()
        summary.dead_letters[reason] += 1


def main(environ: Mapping[str, str], *, quick: bool = False) -> int:
    """Entry point of `scm-relay demo`."""
    configure_logging("console", environ.get("SCM_RELAY_LOG_LEVEL", "WARNING").upper())
    lines, codes_per_line = (2, 100) if quick else (4, 500)
    try:
        summary = asyncio.run(run_demo(environ, lines=lines, codes_per_line=codes_per_line))
    except DemoUnavailableError as exc:
        print(f"scm-relay demo: {exc}", file=sys.stderr)
        return 1
    print(summary.table())
    return 0
