"""`python -m sim` (`make sim`): run seeded histories of the whole relay and judge them.

    python -m sim --seeds 200            # seeds 0..199, two processes
    python -m sim --seed 1234 --history  # one seed and its readable history

A history is the same for the same seed, byte for byte (the process runs with
PYTHONHASHSEED=0: it starts itself again with it when needed). A failing seed is
printed with its violations, what it looks like (see `classify`), and the command that
replays it. `--write FILE` records the run (seeds, seeds per second, the commit, what
the failing seeds found) in the generated section of FILE.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import time
import traceback
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from bench.common import commit


def markers(section: str) -> tuple[str, str]:
    """The comments around a section `--write` replaces."""
    return (
        f"<!-- simulation:{section}:begin (written by python -m sim) -->",
        f"<!-- simulation:{section}:end -->",
    )


@dataclass(frozen=True)
class Outcome:
    seed: int
    violations: tuple[str, ...]
    kinds: tuple[str, ...]
    seconds: float
    virtual_s: float

    @property
    def clean(self) -> bool:
        return not self.violations


def run_seed(seed: int) -> Outcome:
    from sim.classify import classify
    from sim.world import simulate

    started = time.perf_counter()
    try:
        verdict, world = simulate(seed)
    except Exception as crashed:  # noqa: BLE001 - one seed's harness failure, reported
        trace = "".join(traceback.format_exception(crashed)[-6:])
        return Outcome(seed, (f"harness: {crashed!r}\n{trace}",), ("harness",), 0.0, 0.0)
    return Outcome(
        seed,
        tuple(verdict.violations),
        tuple(classify(verdict, world)) if not verdict.clean else (),
        time.perf_counter() - started,
        world.loop.time(),
    )


def replay_command(seed: int) -> str:
    return f"make sim SEED={seed}"


def main(argv: list[str] | None = None) -> int:
    if os.environ.get("PYTHONHASHSEED") != "0":
        # Set iteration order of strings depends on the hash seed: fix it, for histories
        # that repeat byte for byte.
        env = {**os.environ, "PYTHONHASHSEED": "0"}
        return subprocess.call([sys.executable, "-m", "sim", *(argv or sys.argv[1:])], env=env)
    parser = argparse.ArgumentParser(prog="python -m sim", description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=100, help="how many seeds (default 100)")
    parser.add_argument("--start", type=int, default=0, help="the first seed (default 0)")
    parser.add_argument("--seed", type=int, help="run this one seed only")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--history", action="store_true", help="print the seed's history")
    parser.add_argument("--write", type=Path, help="record the run in this file's section")
    parser.add_argument("--section", default="latest", help="which section --write replaces")
    parser.add_argument("--json", action="store_true", help="one JSON summary on stdout")
    args = parser.parse_args(argv)
    if args.seed is not None:
        return _one(args.seed, history=args.history)
    seeds = range(args.start, args.start + args.seeds)
    started = time.perf_counter()
    with multiprocessing.get_context("fork").Pool(args.jobs) as pool:
        outcomes = []
        for outcome in pool.imap_unordered(run_seed, seeds, chunksize=4):
            outcomes.append(outcome)
            if not outcome.clean and not args.json:
                print(
                    f"seed {outcome.seed}: {len(outcome.violations)} violation(s) "
                    f"[{', '.join(outcome.kinds)}]: {outcome.violations[0][:300]}\n"
                    f"  replay: {replay_command(outcome.seed)}",
                    flush=True,
                )
    elapsed = time.perf_counter() - started
    outcomes.sort(key=lambda o: o.seed)
    failed = [o for o in outcomes if not o.clean]
    rate = len(outcomes) / elapsed if elapsed else 0.0
    if args.json:
        summary = {
            "seeds": len(outcomes),
            "seconds": round(elapsed, 1),
            "failed": {
                str(o.seed): {"kinds": list(o.kinds), "violations": list(o.violations[:5])}
                for o in failed
            },
        }
        print(json.dumps(summary))
        return 1 if failed else 0
    print(
        f"{len(outcomes)} seeds ({args.start}..{args.start + args.seeds - 1}) in {elapsed:.1f} s: "
        f"{rate:.1f} seeds/s with {args.jobs} processes; {len(failed)} failed"
    )
    kinds = Counter(kind for o in failed for kind in o.kinds)
    for kind, count in kinds.most_common():
        first = [o.seed for o in failed if kind in o.kinds][:5]
        print(f"  {kind}: {count} seed(s), e.g. {first}")
    if args.write is not None:
        _write(args.write, args.section, outcomes, elapsed, args.jobs)
    return 1 if failed else 0


def _one(seed: int, *, history: bool) -> int:
    from sim.classify import classify
    from sim.world import simulate

    verdict, world = simulate(seed)
    if history:
        print(world.readable_history())
    print(f"seed {seed}: {world.describe()}")
    if verdict.clean:
        print("clean")
        return 0
    print(f"{len(verdict.violations)} violation(s) [{', '.join(classify(verdict, world))}]:")
    for violation in verdict.violations[:50]:
        print(f"  {violation}")
    print(f"replay: {replay_command(seed)} (with its history: add HISTORY=1)")
    return 1


def _write(path: Path, section: str, outcomes: list[Outcome], elapsed: float, jobs: int) -> None:
    begin, end = markers(section)
    measured_on = commit()
    failed = [o for o in outcomes if not o.clean]
    lines = [
        begin,
        f"{len(outcomes)} seeds ({outcomes[0].seed}..{outcomes[-1].seed}) on commit "
        f"`{measured_on}`, {datetime.now(UTC).date().isoformat()}: "
        f"{len(outcomes) / elapsed:.1f} seeds/s with {jobs} processes; "
        f"{len(outcomes) - len(failed)} clean, {len(failed)} with violations.",
    ]
    if failed:
        lines += ["", "| found | seeds | first seeds |", "|---|---|---|"]
        kinds = Counter(kind for o in failed for kind in o.kinds)
        for kind, count in kinds.most_common():
            first = ", ".join(str(o.seed) for o in failed if kind in o.kinds)
            lines.append(f"| {kind} | {count} | {first[:120]} |")
    lines.append(end)
    text = path.read_text()
    if begin not in text:
        raise SystemExit(f"{path} has no {section!r} simulation markers")
    head, rest = text.split(begin, 1)
    _old, tail = rest.split(end, 1)
    path.write_text(head + "\n".join(lines) + tail)
    print(f"wrote the run to {path}")


if __name__ == "__main__":
    sys.exit(main())
