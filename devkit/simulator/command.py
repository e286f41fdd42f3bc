"""`scm-relay simulator`: the simulator as a process of its own, from the parsed command
line (service/cli.py parses it, so that `scm-relay --help` lists the command even where
the development kit is not installed)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Mapping
from typing import Final

from pydantic import ValidationError

from devkit.simulator.app import serve
from devkit.simulator.seed import default_seed, load_seed
from devkit.simulator.state import Account, Faults

# The exit codes of the `scm-relay` command line (service/cli.py).
EXIT_OK: Final = 0
EXIT_USAGE: Final = 2


def main(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    """Serve the simulator until SIGINT or SIGTERM; 2 with a message on a bad option."""
    token = args.token or environ.get("SCM_RELAY_API_TOKEN")
    if not token:
        print("scm-relay simulator: give --token or set SCM_RELAY_API_TOKEN", file=sys.stderr)
        return EXIT_USAGE
    knobs: dict[str, str] = {}
    for item in args.fault:
        name, sep, value = item.partition("=")
        if not sep:
            print(f"scm-relay simulator: --fault {item!r} is not KNOB=VALUE", file=sys.stderr)
            return EXIT_USAGE
        knobs[name.strip()] = value.strip()
    try:
        if args.seed:
            seed = load_seed(args.seed)
        elif args.codes_per_campaign is not None:
            seed = default_seed(args.codes_per_campaign)
        else:
            seed = default_seed()
        faults = Faults.model_validate(knobs)
    except (OSError, ValidationError) as exc:
        print(f"scm-relay simulator: {exc}", file=sys.stderr)
        return EXIT_USAGE
    account = Account(seed, faults, rng_seed=args.rng_seed)
    asyncio.run(serve(account, token, args.host, args.port))
    return EXIT_OK
