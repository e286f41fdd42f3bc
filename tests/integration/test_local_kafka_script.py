"""deploy/local-kafka/kafka-local: an interrupted run never blocks the next one.

Each test uses its own run directory (SCM_RELAY_KAFKA_RUN_DIR), so the broker
of the test session itself is never touched.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.kafka_support import KAFKA_LOCAL, kafka_local

pytestmark = pytest.mark.kafka

PROBE = KAFKA_LOCAL.parent / "probe_metadata.py"


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A killed child of another process may linger as a zombie; it is not running.
    state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    return state != "Z"


def wait_dead(pid: int, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while alive(pid):
        assert time.monotonic() < deadline, f"pid {pid} still alive after {timeout_s} s"
        time.sleep(0.1)


def answers_metadata(address: str) -> bool:
    probe = subprocess.run([sys.executable, str(PROBE), address], timeout=30, check=False)
    return probe.returncode == 0


def test_start_replaces_a_broker_left_by_a_killed_run_and_stop_cleans_up(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    first = kafka_local(run_dir, "start")
    assert first.returncode == 0, first.stderr
    first_pid = int((run_dir / "broker.pid").read_text())
    first_data = Path((run_dir / "data-dir").read_text().strip())
    assert first_data.is_dir()

    # An interrupted `make test`: the broker dies hard, its pid file and data stay behind.
    os.kill(first_pid, signal.SIGKILL)
    wait_dead(first_pid)
    assert (run_dir / "broker.pid").exists()

    second = kafka_local(run_dir, "start")
    assert second.returncode == 0, second.stderr
    second_pid = int((run_dir / "broker.pid").read_text())
    assert second_pid != first_pid
    assert not first_data.exists(), "the killed run's data directory was not deleted"
    address = kafka_local(run_dir, "address").stdout.strip()
    assert answers_metadata(address)

    # Starting again while one runs replaces it: a fresh, empty broker every time.
    third = kafka_local(run_dir, "start")
    assert third.returncode == 0, third.stderr
    wait_dead(second_pid)
    third_pid = int((run_dir / "broker.pid").read_text())
    third_data = Path((run_dir / "data-dir").read_text().strip())

    stopped = kafka_local(run_dir, "stop")
    assert stopped.returncode == 0, stopped.stderr
    assert not alive(third_pid)
    assert not third_data.exists()
    assert kafka_local(run_dir, "status").returncode == 3


def test_a_stale_pid_file_naming_another_process_is_never_signalled(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        (run_dir / "broker.pid").write_text(f"{bystander.pid}\n")
        assert kafka_local(run_dir, "stop").returncode == 0
        assert bystander.poll() is None, "kafka-local signalled a process it did not start"
        assert not (run_dir / "broker.pid").exists()
    finally:
        bystander.kill()
        bystander.wait()


def test_start_on_a_busy_port_fails_with_a_clear_message(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = kafka_local(tmp_path / "run", "start", port=port)
    assert result.returncode == 1
    assert f"port {port} (SCM_RELAY_KAFKA_PORT) is in use" in result.stderr
