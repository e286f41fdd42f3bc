"""One chaos case: its own topics and simulator, relays as processes, and the checks.

Every case publishes the same kind of backlog (codes updated once, codes updated
A, B, A in order, a few records that are not JSON), breaks something while the
relays drain it, and then checks what an operator would: codes lost, codes
updated twice, A, B, A orders broken, tasks not recorded once or without exactly
one result, dead letters not written exactly once, 429s, and how long the relay
took to send again after the fault ended.

Dead letters are judged by where they came from: the source topic, partition and
offset headers of each (the dead-letter contract of docs/design.md, section 2.3)
against the positions the invalid records were published at, so that one lost
and one written twice cannot cancel out. A case that cannot run here says why
and is reported as skipped, never as clean.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chaos.backlog import INVALID, Backlog, publish_lanes
from devkit.harness import (
    TopicFactory,
    Topics,
    admin_client,
    make_topics,
    relay_process,
    wait_until,
)
from devkit.simulator.state import Faults
from tests.api_support import Simulator, simulator
from tests.integration.test_exactly_once import a_b_a_events, everything_settled
from tests.integration.test_pipeline_resilience import GROUP, by_code, one_code_events
from tests.pipeline_support import (
    holds_partitions,
    ledger_task_ids,
    publish,
    read_topic,
    relay_settings,
)

STEADY = Faults(pending_delay_s=0.05, progress_delay_s=0.05, jitter_s=0.05)


@dataclass(frozen=True)
class Size:
    """How much a case drains: `codes` once, `sequences` codes A, B, A, `invalid`
    records that are not JSON."""

    codes: int = 2000
    sequences: int = 50
    invalid: int = 5
    partitions: int = 6

    @property
    def uploads(self) -> int:
        """Uploads the backlog needs at least (10 values per request in these runs)."""
        return self.codes // 10 + 3 * self.sequences // 10


SMOKE = Size(codes=300, sequences=10, invalid=2, partitions=4)


@dataclass
class Row:
    """What one case found."""

    case: str
    fault: str
    codes: int = 0
    lost: int = 0
    twice: int = 0
    out_of_order: int = 0
    tasks: int = 0
    not_recorded_once: int = 0
    not_one_result: int = 0
    dead_letters_wrong: int = 0
    throttled: int = 0
    recovery_s: float | None = None
    total_s: float = 0.0
    notes: list[str] = field(default_factory=list)
    # Why the case could not run here (then none of its figures were measured).
    skipped: str | None = None
    # What the case checks beyond the columns and found wrong (in the notes too).
    other_wrong: int = 0

    @property
    def clean(self) -> bool:
        """Ran, and nothing lost, nothing twice, order kept, every task once with one
        result, every dead letter once."""
        return self.skipped is None and not (
            self.lost
            or self.other_wrong
            or self.twice
            or self.out_of_order
            or self.not_recorded_once
            or self.not_one_result
            or self.dead_letters_wrong
        )


class Case:
    """A running case; use `running_case`."""

    def __init__(
        self,
        name: str,
        fault: str,
        bootstrap: str,
        topics: Topics,
        sim: Simulator,
        size: Size,
        logs: Path,
        stack: AsyncExitStack,
        settings: dict[str, Any],
    ) -> None:
        self.row = Row(case=name, fault=fault)
        self.bootstrap = bootstrap
        self.topics = topics
        self.sim = sim
        self.size = size
        self._logs = logs
        self._stack = stack
        self._settings = settings
        self._started = time.monotonic()
        self._recovery: asyncio.Task[None] | None = None
        self.exit_codes: dict[str, int] = {}
        # Where the records that are not JSON were published: (topic, partition, offset).
        self.invalid_at: list[tuple[str, int, int]] = []
        # Extended id -> the batch numbers the API must give it, in that order.
        self.expected: dict[str, list[str]] = {}
        self.uploads = size.uploads  # that the backlog needs at least

    def log_path(self, name: str) -> Path:
        return self._logs / f"{self.row.case}-{name}.log"

    async def relay(
        self, name: str, prefix: tuple[str, ...] = (), **overrides: Any
    ) -> asyncio.subprocess.Process:
        """Start relay `name` as its own process (stopped at the end of the case)."""
        settings = relay_settings(
            self.bootstrap,
            self.sim.base_url,
            self.topics,
            kafka_transactional_id=f"{self.topics.group}-{name}",
            **{**self._settings, **overrides},
        )
        return await self._stack.enter_async_context(
            relay_process(settings, self.log_path(name), prefix)
        )

    async def joined(self, name: str, timeout_s: float = 90) -> None:
        """Wait until relay `name` has been assigned input partitions."""
        await wait_until(
            lambda: holds_partitions(self.log_path(name)),
            what=f"relay {name} to get partitions",
            timeout_s=timeout_s,
            interval_s=0.2,
        )

    async def progress(self, uploads: int, timeout_s: float = 120) -> None:
        """Wait until `uploads` more uploads were accepted (or the backlog's last one)."""
        accepted = self.sim.account.stats.uploads_accepted
        await self.sim.wait_uploads(min(accepted + uploads, self.uploads), timeout_s)

    def moment(self, what: str) -> None:
        """Note how far the drain was when `what` happened; a fault after the last upload
        the backlog needs did not land mid-drain, and the row says so."""
        accepted = self.sim.account.stats.uploads_accepted
        self.row.notes.append(f"{what} at {accepted} of {self.uploads}+ uploads")
        if accepted >= self.uploads:
            self.row.notes.append(f"NOT MID-DRAIN: {what} after the backlog's uploads")

    def fault_over(self) -> None:
        """The fault ended now: time how long until the API accepts an upload again."""
        accepted = self.sim.account.stats.uploads_accepted
        started = time.monotonic()

        async def measure() -> None:
            await self.sim.wait_uploads(accepted + 1, timeout_s=3600)
            self.row.recovery_s = time.monotonic() - started

        if self._recovery is not None:
            self._recovery.cancel()
        self._recovery = asyncio.create_task(measure())

    async def stop(self, process: asyncio.subprocess.Process, name: str) -> int:
        """SIGTERM and wait for the exit code."""
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(process.wait(), 90)
        self.exit_codes[name] = code
        return code

    async def finish(self, processes: dict[str, asyncio.subprocess.Process]) -> Row:
        """Wait until everything is settled, stop the relays, check."""
        row, sim = self.row, self.sim
        finished = await everything_settled(self.bootstrap, self.topics, sim, timeout_s=600)
        row.total_s = time.monotonic() - self._started
        if self._recovery is not None:
            if not self._recovery.done():
                row.notes.append("no upload after the fault (nothing was left to send)")
            self._recovery.cancel()
        for name, process in processes.items():
            if process.returncode is None:
                code = await self.stop(process, name)
                if code != 0:
                    row.notes.append(f"relay {name} exited {code} at its stop")
        created = list(sim.account.tasks)
        recorded = await ledger_task_ids(self.bootstrap, self.topics.tasks)
        results = [o["task_id"] for o in finished]
        row.tasks = len(created)
        row.not_recorded_once = (
            len(set(created) ^ set(recorded)) + len(recorded) - len(set(recorded))
        )
        row.not_one_result = len(set(created) ^ set(results)) + len(results) - len(set(results))
        self.judge_codes()
        row.dead_letters_wrong = await self.dead_letters_wrong()
        row.throttled = sim.account.stats.throttled
        return row

    def judge_codes(self) -> None:
        """Each code's history at the API against the changes published for it."""
        account, row = self.sim.account, self.row

        def history(extended_id: str) -> list[str]:
            code = account.find_code("extended_id", extended_id)
            return [str(entry["set"].get("batch_number")) for entry in code.history] if code else []

        verdict = code_verdict(self.expected, history)
        row.codes = len(self.expected)
        row.lost, row.twice, row.out_of_order = verdict.lost, verdict.twice, verdict.out_of_order
        if verdict.wrong_end:
            row.other_wrong += verdict.wrong_end
            row.notes.append(f"{verdict.wrong_end} codes not at their last value")

    async def dead_letters_wrong(self) -> int:
        """Invalid records without exactly one dead letter, plus dead letters of records
        that were not published invalid (every dead letter is read: a duplicate shows)."""
        dead = await read_topic(self.bootstrap, self.topics.dlq, 10**6, timeout_s=5)
        wrong, missing, repeated = dead_letter_verdict(
            self.invalid_at, [source_position(record.headers) for record in dead]
        )
        if wrong:
            self.row.notes.append(
                f"dead letters: {len(dead)} for {len(self.invalid_at)} invalid records, "
                f"{missing} missing, {repeated} written more than once"
            )
        return wrong


def dead_letter_verdict(
    invalid: list[tuple[str, int, int]], named: list[tuple[str, int, int]]
) -> tuple[int, int, int]:
    """(wrong, missing, repeated): invalid positions not named by exactly one dead letter
    plus dead letters naming any other position; of the invalid positions, those named
    by none and those named more than once."""
    letters = Counter(named)
    wanted = set(invalid)
    missing = sum(1 for position in wanted if letters[position] == 0)
    repeated = sum(1 for position in wanted if letters[position] > 1)
    strays = sum(count for position, count in letters.items() if position not in wanted)
    return missing + repeated + strays, missing, repeated


@dataclass(frozen=True)
class CodeVerdict:
    """Codes given fewer updates than changes published for them (lost), more (twice),
    as many in another order, and those not ending at their last change."""

    lost: int = 0
    twice: int = 0
    out_of_order: int = 0
    wrong_end: int = 0


def code_verdict(
    expected: dict[str, list[str]], history: Callable[[str], list[str]]
) -> CodeVerdict:
    """Judge each code's history at the API (the values it was given, in the order they
    were applied) against the changes published for it, in their order."""
    lost = twice = out_of_order = wrong_end = 0
    for code, wanted in expected.items():
        got = history(code)
        if len(got) < len(wanted):
            lost += 1
        elif len(got) > len(wanted):
            twice += 1
        elif got != wanted:
            out_of_order += 1
        if got[-1:] != wanted[-1:]:
            wrong_end += 1
    return CodeVerdict(lost, twice, out_of_order, wrong_end)


def source_position(headers: Any) -> tuple[str, int, int]:
    """The input position a dead letter names in its source headers."""
    named = {key: value.decode() for key, value in headers or ()}
    return (
        named.get("scm_relay.source.topic", "?"),
        int(named.get("scm_relay.source.partition", "-1")),
        int(named.get("scm_relay.source.offset", "-1")),
    )


@asynccontextmanager
async def running_case(
    name: str,
    fault: str,
    bootstrap: str,
    size: Size,
    logs: Path,
    faults: Faults = STEADY,
    sim_host: str = "127.0.0.1",
    replicas: int = 1,
    leader: int | None = None,
    backlog: Backlog | None = None,
    **settings: Any,
) -> AsyncIterator[Case]:
    """Topics (`replicas` copies of each, all led by node `leader` when given), a
    simulator and the backlog published (`backlog`, or the one `size` describes:
    single-code events, A, B, A codes, records that are not JSON); relays are started
    by the case."""
    settings = {"batch_max_values": 10, "api_request_timeout_s": 2.0, **settings}
    async with AsyncExitStack() as stack:
        admin = await stack.enter_async_context(admin_client(bootstrap))
        topics = await make_topics(
            TopicFactory(admin, replicas=replicas, leader=leader), partitions=size.partitions
        )
        codes = len(backlog.expected) if backlog else size.codes + size.sequences
        sim = await stack.enter_async_context(
            simulator(faults, codes_per_campaign=codes, host=sim_host)
        )
        case = Case(name, fault, bootstrap, topics, sim, size, logs, stack, settings)
        if backlog is None:
            a, b, a_again = a_b_a_events(size.codes, size.sequences)
            events: list[Any] = [*a, *one_code_events(size.codes), *b, *a_again]
            await publish(bootstrap, topics.input, events, key_of=by_code)
            invalid = await publish(bootstrap, topics.input, [b"{not json"] * size.invalid)
            case.invalid_at = [(topics.input, p, offset) for p, offset in invalid]
            case.expected = {f"11X{n:06d}": [f"B{n // GROUP}"] for n in range(size.codes)}
            for n in range(size.codes, size.codes + size.sequences):
                case.expected[f"11X{n:06d}"] = ["A", "B", "A"]
        else:
            landed = await publish_lanes(bootstrap, topics.input, backlog.partitions)
            case.invalid_at = [(topics.input, p, offset) for p, offset, v in landed if v == INVALID]
            case.expected = backlog.expected
            case.uploads = backlog.uploads(settings["batch_max_values"])
        yield case
