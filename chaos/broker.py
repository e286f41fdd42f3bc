"""A broker (or a cluster) of the chaos run's own, never the test session's, to
kill and pause."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from aiokafka.errors import KafkaError

from devkit.harness import admin_client, kafka_local, start_broker, stop_broker


class Broker:
    """`kafka-local` in `run_dir`: one broker, or a KRaft cluster of `nodes` (each
    node broker and controller; N replicas, N - 1 in sync). Start, SIGKILL, restart
    on its data, pause. `node` names a cluster's node (1..N); None for one broker."""

    def __init__(self, run_dir: Path, host: str = "127.0.0.1", nodes: int = 1) -> None:
        self.run_dir = run_dir
        self.host = host
        self.nodes = nodes
        self.bootstrap = ""

    def _env(self) -> dict[str, str]:
        return {"SCM_RELAY_KAFKA_HOST": self.host, "SCM_RELAY_KAFKA_NODES": str(self.nodes)}

    def _run(self, *args: str) -> str:
        done = kafka_local(self.run_dir, *args, env=self._env())
        assert done.returncode == 0, f"kafka-local {' '.join(args)}: {done.stderr}"
        return done.stdout.strip()

    @staticmethod
    def _node(node: int | None) -> tuple[str, ...]:
        return () if node is None else (str(node),)

    def start(self) -> None:
        self.bootstrap = start_broker(self.run_dir, env=self._env())

    def stop(self) -> None:
        stop_broker(self.run_dir)

    def crash(self, node: int | None = None) -> None:
        """SIGKILL: no shutdown, no flush; the data stays."""
        self._run("crash", *self._node(node))

    def restart(self, node: int | None = None) -> None:
        """Start again on the same data and port (blocks until it answers)."""
        self._run("restart", *self._node(node))

    def pause(self) -> None:
        os.kill(int(self._run("pid")), signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(int(self._run("pid")), signal.SIGCONT)

    async def leaders(self, topic: str) -> dict[int, int]:
        """Partition -> the node leading it."""
        async with admin_client(self.bootstrap) as admin:
            (described,) = await admin.describe_topics([topic])
        return {p["partition"]: p["leader"] for p in described["partitions"]}

    async def committed(self, group: str) -> int | None:
        """The sum of `group`'s committed offsets (what it has consumed for good), or
        None while the cluster cannot say (its coordinator just lost)."""
        try:
            async with admin_client(self.bootstrap) as admin:
                offsets = await admin.list_consumer_group_offsets(group)
        except KafkaError:
            return None
        return sum(max(int(meta.offset), 0) for meta in offsets.values())
