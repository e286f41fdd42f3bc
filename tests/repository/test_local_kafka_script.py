"""deploy/local-kafka/kafka-local: an interrupted run never blocks the next one.

Each test uses its own run directory (SCM_RELAY_KAFKA_RUN_DIR), so the broker
of the test session itself is never touched.
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from devkit.harness import KAFKA_LOCAL, kafka_local

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


def answers_metadata(address: str, brokers: int = 1) -> bool:
    probe = subprocess.run(
        [sys.executable, str(PROBE), address, str(brokers)], timeout=30, check=False
    )
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


def test_a_cluster_starts_loses_a_node_takes_it_back_and_stops_clean(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    nodes = {"SCM_RELAY_KAFKA_NODES": "3"}
    started = kafka_local(run_dir, "start", env=nodes)
    assert started.returncode == 0, started.stderr
    bootstrap = kafka_local(run_dir, "address").stdout.strip().split(",")
    assert len(bootstrap) == 3
    pids = [int(kafka_local(run_dir, "pid", str(n)).stdout) for n in (1, 2, 3)]
    data = [Path((run_dir / f"node-{n}" / "data-dir").read_text().strip()) for n in (1, 2, 3)]
    # Every node sees all three brokers: one cluster, not three.
    assert all(answers_metadata(address, brokers=3) for address in bootstrap)

    refused = kafka_local(run_dir, "crash")
    assert refused.returncode == 1
    assert "name a node from 1 to 3" in refused.stderr
    assert kafka_local(run_dir, "crash", "2").returncode == 0
    wait_dead(pids[1])
    assert kafka_local(run_dir, "status").returncode == 3
    assert answers_metadata(bootstrap[0])  # the other two still serve
    restarted = kafka_local(run_dir, "restart", "2")
    assert restarted.returncode == 0, restarted.stderr
    assert data[1].is_dir(), "the restart lost node 2's data"
    assert kafka_local(run_dir, "status").returncode == 0

    stopped = kafka_local(run_dir, "stop")
    assert stopped.returncode == 0, stopped.stderr
    assert not any(alive(pid) for pid in pids)
    assert not any(path.exists() for path in data)
    assert not list(run_dir.glob("node-*"))
    assert kafka_local(run_dir, "status").returncode == 3


FETCH_JARS = KAFKA_LOCAL.parent / "fetch_jars.py"


def mirror_of(jars: Path, lock_lines: list[str], root: Path) -> str:
    """A file:// Maven repository holding `jars` (name -> content) at their coordinates."""
    for line in lock_lines:
        group, artifact, version = line.split()[0].split(":")
        folder = root / group.replace(".", "/") / artifact / version
        folder.mkdir(parents=True)
        (folder / f"{artifact}-{version}.jar").write_bytes(
            (jars / f"{artifact}-{version}.jar").read_bytes()
        )
    return root.as_uri()


def test_fetch_jars_takes_the_lock_from_a_maven_repository_checking_each_digest(
    tmp_path: Path,
) -> None:
    source = tmp_path / "source"
    source.mkdir()
    (source / "good-1.0.jar").write_bytes(b"good jar")
    (source / "bad-1.0.jar").write_bytes(b"tampered")
    good = f"org.example:good:1.0 {hashlib.sha256(b'good jar').hexdigest()}"
    bad = f"org.example:bad:1.0 {hashlib.sha256(b'the original').hexdigest()}"
    repository = mirror_of(source, [good, bad], tmp_path / "repo")
    target = tmp_path / "jars"
    target.mkdir()
    (target / "old-0.9.jar").write_bytes(b"a jar of an older lock")
    env = {**os.environ, "SCM_RELAY_MAVEN_REPO": repository}

    lock = tmp_path / "jars.lock"

    def fetch() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, str(FETCH_JARS), str(lock), str(target)],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    lock.write_text(f"# a comment\n{good}\n")
    fetched = fetch()
    assert fetched.returncode == 0, fetched.stderr
    assert (target / "good-1.0.jar").read_bytes() == b"good jar"
    assert not (target / "old-0.9.jar").exists(), "a jar the lock does not list stayed"

    lock.write_text(f"{good}\n{bad}\n")
    refused = fetch()
    assert refused.returncode == 1
    assert "bad-1.0.jar" in refused.stderr
    assert "the lock says" in refused.stderr
    assert not (target / "bad-1.0.jar").exists()
