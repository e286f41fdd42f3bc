"""`make chaos`: every case at full size on a broker of its own; writes docs/reliability.md.

    python -m chaos.run [--smoke] [--case NAME ...] [--write FILE] [--seed N] [--logs DIR]

Exit status 0 when every case that ran is clean (nothing lost, nothing twice, order
kept, every task recorded once with one result, every dead letter once), 1 otherwise.
A case that cannot run here (the network cut without root) is listed as skipped, in
the last line and in the table, with no figures: never as clean.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import platform
import random
import re
import sys
import tempfile
from pathlib import Path

from bench.common import commit
from chaos.broker import Broker
from chaos.cases import CASES, Env
from chaos.harness import SMOKE, Row, Size

REPO = Path(__file__).resolve().parents[1]
KEPT_MARK = "<!-- kept below -->"


def table(rows: list[Row]) -> str:
    head = (
        "| case | fault | codes | lost | twice | A,B,A broken | tasks | not recorded once "
        "| not one result | dead letters wrong | 429s | recovery s | total s | notes |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    return head + "\n".join(line(r) for r in rows) + "\n"


def line(r: Row) -> str:
    if r.skipped is not None:
        # Nothing measured: no figure is shown, so that no one reads it as clean.
        return f"| {r.case} | {r.fault} |{' - |' * 11} **skipped**: {r.skipped} |"
    return (
        f"| {r.case} | {r.fault} | {r.codes} | {r.lost} | {r.twice} | {r.out_of_order} "
        f"| {r.tasks} | {r.not_recorded_once} | {r.not_one_result} | {r.dead_letters_wrong} "
        f"| {r.throttled} | {'-' if r.recovery_s is None else f'{r.recovery_s:.1f}'} "
        f"| {r.total_s:.0f} | {'; '.join(r.notes)} |"
    )


def machine() -> str:
    return (
        f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}"
    )


def write(path: Path, rows: list[Row], seed: int, names: list[str]) -> None:
    """Write the table of `rows`; the rows of cases not run this time (`names` lists
    every case, in order) are kept from the file, and the header says from when."""
    kept, earlier, earlier_date = f"{KEPT_MARK}\n", {}, "an earlier run"
    if path.exists():
        text = path.read_text()
        if KEPT_MARK in text:
            kept = text[text.index(KEPT_MARK) :]
            text = text[: text.index(KEPT_MARK)]
        if dated := re.search(r"on (\d{4}-\d{2}-\d{2})( at commit `\w+(\+changes)?`)?", text):
            earlier_date = dated.group(1) + (dated.group(2) or "")
        for line in text.splitlines():
            name = line.split("|")[1].strip() if line.startswith("| ") else ""
            if name in names:
                earlier[name] = line
    fresh = {row.case: table([row]).splitlines()[-1] for row in rows}
    old = [name for name in earlier if name not in fresh]
    lines = [fresh.get(name) or earlier[name] for name in names if name in fresh or name in earlier]
    today = datetime.date.today().isoformat()
    body = (
        "# Reliability: the fault suite's figures\n\n"
        f"Written by `make chaos` on {today} at commit `{commit()}` ({machine()}, seed {seed})"
        + (f"; {', '.join(fresh)} run alone, other rows kept from {earlier_date}" if old else "")
        + "; every row is one "
        "case of `chaos/cases.py`: a backlog published to a real broker of the run's "
        "own, drained by the relay as its own processes against the simulator (10 uploads "
        "per second, 10 values per request, 250 in the interleaved_* cases), broken as the "
        "fault column says. "
        "*Recovery* is the time from the end of the last fault to the next upload the API "
        "accepted; *total* the whole case, backlog included. A case is clean when its "
        "lost, twice, A,B,A, tasks and dead-letter columns are 0; a skipped case was not run.\n\n"
        + "\n".join(table([]).splitlines()[:2] + lines)
        + "\n\n"
        + kept
    )
    path.write_text(body)


async def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="small sizes and counts")
    parser.add_argument("--case", action="append", help="run only these cases")
    parser.add_argument("--write", type=Path, help="write the table to this markdown file")
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--logs", type=Path, help="keep the relays' and brokers' logs here")
    args = parser.parse_args(argv)
    chosen = [case for case in CASES if not args.case or case.__name__ in args.case]
    with tempfile.TemporaryDirectory(prefix="scm-relay-chaos-") as scratch:
        logs = args.logs or Path(scratch)
        logs.mkdir(parents=True, exist_ok=True)
        broker = Broker(logs / "broker")
        broker.start()
        try:
            env = Env(
                broker=broker,
                size=SMOKE if args.smoke else Size(),
                logs=logs,
                smoke=args.smoke,
                rng=random.Random(args.seed),
            )
            rows = []
            for case in chosen:
                print(f"chaos: {case.__name__} ...", flush=True)
                row = await case(env)
                rows.append(row)
                print(table([row]).splitlines()[-1], flush=True)
        finally:
            broker.stop()
    print(table(rows))
    skipped = [row.case for row in rows if row.skipped is not None]
    unclean = [row.case for row in rows if row.skipped is None and not row.clean]
    summary = [f"{len(rows) - len(skipped) - len(unclean)} clean"]
    summary.append(f"not clean: {', '.join(unclean)}" if unclean else "0 not clean")
    if skipped:
        summary.append(f"skipped (not run here): {', '.join(skipped)}")
    print("chaos: " + "; ".join(summary))
    if args.write:
        write(args.write, rows, args.seed, [case.__name__ for case in CASES])
    return 1 if unclean else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
