"""`python -m service` and the `scm-relay` console script: the CLI, with `run`'s
SIGTERM and SIGINT captured before anything else is imported (service/early_signals.py)."""

import sys

from service.early_signals import capture_for


def main() -> int:
    """The entry point: capture `run`'s signals, then load and run the CLI."""
    capture_for(sys.argv[1:])
    from service.cli import main as cli_main

    return cli_main()


if __name__ == "__main__":
    sys.exit(main())
