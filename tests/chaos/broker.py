"""A broker of the chaos run's own (never the test session's), to kill and pause."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from tests.kafka_support import kafka_local


class Broker:
    """A `kafka-local` broker in `run_dir`: start, SIGKILL, restart on its data, pause."""

    def __init__(self, run_dir: Path, host: str = "127.0.0.1") -> None:
        self.run_dir = run_dir
        self.host = host
        self.bootstrap = ""

    def start(self) -> None:
        started = kafka_local(self.run_dir, "start", env={"SCM_RELAY_KAFKA_HOST": self.host})
        assert started.returncode == 0, started.stderr
        self.bootstrap = kafka_local(self.run_dir, "address").stdout.strip()

    def stop(self) -> None:
        kafka_local(self.run_dir, "stop")

    def _pid(self) -> int:
        return int((self.run_dir / "broker.pid").read_text())

    def crash(self) -> None:
        """SIGKILL: no shutdown, no flush; the data stays."""
        crashed = kafka_local(self.run_dir, "crash")
        assert crashed.returncode == 0, crashed.stderr

    def restart(self) -> None:
        """Start again on the same data and port (blocks until it answers)."""
        restarted = kafka_local(self.run_dir, "restart")
        assert restarted.returncode == 0, restarted.stderr

    def pause(self) -> None:
        os.kill(self._pid(), signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self._pid(), signal.SIGCONT)
