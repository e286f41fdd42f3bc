"""A network namespace joined to this host by a veth pair, to cut a relay off the network.

Created and removed by the fault suite itself, with addresses of its own
(10.213.0.0/30); nothing else on the machine is touched. Needs root (CAP_NET_ADMIN).
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

HOST_ADDRESS = "10.213.0.1"
INSIDE_ADDRESS = "10.213.0.2"


def available() -> str | None:
    """None when namespaces can be made here, else why not."""
    if os.geteuid() != 0:
        return "needs root (CAP_NET_ADMIN) for a network namespace and a veth pair"
    try:
        subprocess.run(["ip", "-V"], capture_output=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "needs iproute2's ip"
    return None


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], capture_output=True, check=True, text=True)


@dataclass(frozen=True)
class Namespace:
    """A namespace at INSIDE_ADDRESS, reaching this host's HOST_ADDRESS over `host_link`."""

    name: str
    host_link: str

    @property
    def prefix(self) -> tuple[str, ...]:
        """Runs a command inside: `ip netns exec NAME ...`."""
        return ("ip", "netns", "exec", self.name)

    def cut(self) -> None:
        """Take the host's end of the link down: nothing passes either way."""
        _ip("link", "set", self.host_link, "down")

    def heal(self) -> None:
        _ip("link", "set", self.host_link, "up")


@contextmanager
def namespace() -> Iterator[Namespace]:
    tag = uuid.uuid4().hex[:6]
    name, host_link, inside_link = f"scmrelay-{tag}", f"scmh-{tag}", f"scmn-{tag}"
    _ip("netns", "add", name)
    try:
        _ip("link", "add", host_link, "type", "veth", "peer", "name", inside_link)
        _ip("link", "set", inside_link, "netns", name)
        _ip("addr", "add", f"{HOST_ADDRESS}/30", "dev", host_link)
        _ip("link", "set", host_link, "up")
        inside = ("netns", "exec", name, "ip")
        _ip(*inside, "addr", "add", f"{INSIDE_ADDRESS}/30", "dev", inside_link)
        _ip(*inside, "link", "set", inside_link, "up")
        _ip(*inside, "link", "set", "lo", "up")
        yield Namespace(name, host_link)
    finally:
        subprocess.run(["ip", "link", "del", host_link], capture_output=True, check=False)
        subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
