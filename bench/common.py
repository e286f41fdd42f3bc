"""What every benchmark needs: a broker, topics, realistic events, a relay process
and the simulator, and readings of them (metrics, committed offsets, peak RSS).

The relay always runs as its own process (`python -m service run`), as in
production, so its memory and CPU are its own; the simulator runs inside the
benchmark process, where its counters can be read directly.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import aiohttp
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from prometheus_client.parser import text_string_to_metric_families

from devkit.harness import (
    REPO_ROOT,
    TopicFactory,
    Topics,
    admin_client,
    end_offsets,
    local_broker,
    make_topics,
    wait_until,
)
from devkit.harness import relay_process as harness_relay_process
from devkit.simulator.app import running_simulator
from devkit.simulator.seed import default_seed
from devkit.simulator.state import Account, Faults
from devkit.simulator.tasks import Task
from service.http import free_port

REPO = REPO_ROOT
TOKEN = "bench-token"
# Simulator knobs for "answers at once, limits lifted".
INSTANT_API: Final = {
    "pending_delay_s": 0.0,
    "progress_delay_s": 0.0,
    "jitter_s": 0.0,
    "upload_rate_per_s": 1_000_000,
    "overall_rate_per_min": 100_000_000,
}
MARKETS = ("DE", "FR", "IT", "ES", "NL", "PL", "CN", "US", "JP")


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- Kafka ------------------------------------------------------------------------


@asynccontextmanager
async def kafka() -> AsyncIterator[str]:
    """The broker: SCM_RELAY_BENCH_KAFKA when set, else a local one of its own run dir."""
    address = os.environ.get("SCM_RELAY_BENCH_KAFKA")
    if address:
        yield address
        return
    heap = {"SCM_RELAY_KAFKA_HEAP": os.environ.get("SCM_RELAY_KAFKA_HEAP", "1g")}
    async with local_broker(REPO / "bench" / ".run", env=heap) as bootstrap:
        yield bootstrap


async def create_topics(bootstrap: str, partitions: int = 3) -> Topics:
    """Fresh topics for one run, as the tests make them (the relay creates the ledger)."""
    async with admin_client(bootstrap) as admin:
        return await make_topics(TopicFactory(admin), partitions)


def make_events(
    count: int, *, groups: int = 36, multi_every: int = 25, seed: int = 7, first_code: int = 0
) -> Iterator[bytes]:
    """`count` change events as upstream sends them: a few dozen scm_data groups (market,
    production date, lot), one code per event, and every `multi_every`-th event a
    pallet of 2 to 20 codes. Every code is new, so nothing is deduplicated."""
    rng = random.Random(seed)
    datas = [
        {
            "intended_market": MARKETS[n % len(MARKETS)],
            "production_date": f"2026-11-{1 + n % 28:02d}",
            "lot": f"L{n:03d}",
        }
        for n in range(groups)
    ]
    code = first_code
    for number in range(count):
        size = rng.randint(2, 20) if multi_every and number % multi_every == 0 else 1
        values = [f"BX{code + i:010d}" for i in range(size)]
        code += size
        event = {
            "constraints": {"extended_id": values},
            "scm_data": datas[rng.randrange(groups)],
            "event_id": f"bench-{number}",
        }
        yield json.dumps(event, separators=(",", ":")).encode()


def best_fill(records: Iterable[bytes], max_values: int = 1000) -> tuple[int, float]:
    """The fewest upload requests these events can take (each scm_data group needs
    ceil(values / max_values)), and the mean values per request that gives."""
    per_group: dict[str, int] = {}
    for record in records:
        event = json.loads(record)
        group = json.dumps(event["scm_data"], sort_keys=True)
        per_group[group] = per_group.get(group, 0) + len(event["constraints"]["extended_id"])
    uploads = sum(-(-values // max_values) for values in per_group.values())
    return uploads, sum(per_group.values()) / uploads


def values_of(record: bytes) -> list[str]:
    values: list[str] = json.loads(record)["constraints"]["extended_id"]
    return values


async def produce(
    bootstrap: str, topic: str, records: Iterable[bytes], *, key: bytes | None = None
) -> None:
    """Publish records keyed by their first code (as upstream is advised to), or all
    under `key` (one hot key: one partition)."""
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", linger_ms=20, max_batch_size=1 << 20
    )
    await producer.start()
    try:
        pending = []
        for record in records:
            # The first code, found without parsing the JSON (a million records at a time).
            record_key = key
            if record_key is None:
                start = record.index(b'"BX') + 1
                record_key = record[start : record.index(b'"', start)]
            pending.append(await producer.send(topic, record, key=record_key))
            if len(pending) >= 20_000:
                await asyncio.gather(*pending)
                pending.clear()
        await asyncio.gather(*pending)
    finally:
        await producer.stop()


async def committed(admin: AIOKafkaAdminClient, group: str, topic: str) -> dict[int, int]:
    offsets = await admin.list_consumer_group_offsets(group)
    return {tp.partition: meta.offset for tp, meta in offsets.items() if tp.topic == topic}


# --- the simulator ----------------------------------------------------------------


class TimedAccount(Account):
    """The simulator's account, noting when each upload reached it (for the latency bench)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.arrivals: dict[str, float] = {}

    def register(self, task: Task, values: int) -> None:
        now = time.time()
        for listed in task.constraints.values():
            for value in listed:
                self.arrivals.setdefault(value, now)
        super().register(task, values)


@asynccontextmanager
async def simulator(
    faults: Mapping[str, Any], *, timed: bool = False
) -> AsyncIterator[tuple[str, Account]]:
    account_class = TimedAccount if timed else Account
    account = account_class(default_seed(100), Faults(**faults))
    async with running_simulator(account, TOKEN) as base_url:
        yield base_url, account


# --- the relay --------------------------------------------------------------------


@dataclass
class RelayProcess:
    process: asyncio.subprocess.Process
    http_port: int
    log_path: Path
    peak_rss_samples: list[int] = field(default_factory=list)

    async def metrics(self, **labels: str) -> dict[str, float]:
        """Each metric summed over the samples with these labels (all when none given;
        histograms as `_sum` and `_count`)."""
        url = f"http://127.0.0.1:{self.http_port}/metrics"
        timeout = aiohttp.ClientTimeout(total=5)
        async with aiohttp.ClientSession(timeout=timeout) as session, session.get(url) as response:
            text = await response.text()
        totals: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if labels.items() <= sample.labels.items():
                    totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
        return totals

    def peak_rss_bytes(self) -> int:
        """The kernel's high-water mark of the relay's resident set (VmHWM)."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmHWM in /proc status")

    def cpu_seconds(self) -> float:
        """User plus system CPU time the relay has used so far."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
        return ticks / os.sysconf("SC_CLK_TCK")

    def check_alive(self) -> None:
        if self.process.returncode is not None:
            tail = self.log_path.read_text()[-3000:]
            raise RuntimeError(f"the relay exited with {self.process.returncode}:\n{tail}")


@asynccontextmanager
async def relay_process(
    bootstrap: str,
    api_url: str,
    topics: Topics,
    log_dir: Path,
    *,
    profile: Path | None = None,
    **settings: Any,
) -> AsyncIterator[RelayProcess]:
    """`python -m service run` with these settings, once it serves /metrics; stopped
    with SIGTERM on exit (killed if it has not stopped 90 s later).

    With `profile`, the relay runs under pyinstrument, whose text report is written
    to that file when the relay exits."""
    port = free_port()
    values = {
        "kafka_bootstrap_servers": bootstrap,
        "api_base_url": api_url,
        "api_token": TOKEN,
        "http_host": "127.0.0.1",
        "http_port": port,
        # Stopping is not measured: with the API down a full drain would wait a minute.
        "shutdown_timeout_s": 3,
        "rebalance_timeout_s": 3,
        **topics.settings(),
        **settings,
    }
    log_path = log_dir / f"relay-{topics.group}.log"
    await asyncio.to_thread(log_dir.mkdir, parents=True, exist_ok=True)
    profiler = ("-m", "pyinstrument", "-r", "text", "-o", str(profile)) if profile else ()
    command = (sys.executable, *profiler, "-m", "service", "run")
    async with harness_relay_process(values, log_path, command=command, stop_grace_s=90) as process:
        relay = RelayProcess(process, port, log_path)

        async def serving() -> bool:
            relay.check_alive()
            with suppress(aiohttp.ClientError, OSError):
                await relay.metrics()
                return True
            return False

        await wait_until(serving, what="the relay to serve /metrics", timeout_s=60)
        yield relay


@dataclass(frozen=True)
class Span:
    """A relay's run over a backlog: from its first fetch to its last offset committed."""

    first_fetch: float
    last_commit: float
    cpu_seconds: float

    @property
    def seconds(self) -> float:
        return self.last_commit - self.first_fetch


async def first_fetch_to_last_commit(
    relay: RelayProcess, bootstrap: str, topics: Topics, *, timeout_s: float, every_s: float
) -> Span:
    """Watch a relay work through the input topic as it stands now (its end offsets)."""
    ends = await end_offsets(bootstrap, topics.input)
    async with admin_client(bootstrap) as admin:

        async def fetched() -> bool:
            relay.check_alive()
            return (await relay.metrics()).get("scm_relay_events_consumed_total", 0) > 0

        async def all_committed() -> bool:
            relay.check_alive()
            return await committed(admin, topics.group, topics.input) == ends

        first_fetch = await wait_until(fetched, timeout_s=120, interval_s=0.01, what="a fetch")
        cpu_before = relay.cpu_seconds()
        last_commit = await wait_until(
            all_committed, timeout_s=timeout_s, interval_s=every_s, what="the last offset committed"
        )
        return Span(first_fetch, last_commit, relay.cpu_seconds() - cpu_before)


def rate(count: float, seconds: float) -> float:
    return count / seconds if seconds > 0 else float("inf")


def commit() -> str:
    """The commit a run measured (short), "unknown" outside a git checkout; with
    "+changes" when the code differs from it (docs/ aside: the reports written by a run
    are not what it measured)."""
    found = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"],  # noqa: S607 - git from PATH
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    if not found:
        return "unknown"
    changed = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!docs"],  # noqa: S607
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return f"{found}+changes" if changed else found


def machine() -> dict[str, str]:
    """What the figures were measured on."""
    cpu = "unknown"
    with suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory = "unknown"
    with suppress(OSError):
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        memory = f"{kib / 1024 / 1024:.0f} GiB"
    return {"cpu": f"{os.cpu_count()} x {cpu}", "memory": memory, "python": sys.version.split()[0]}
