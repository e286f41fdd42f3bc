#!/usr/bin/env python3
"""Answer whether a Kafka broker serves metadata: exit 0 when it lists a broker
(or at least the number of brokers given as the second argument, for a cluster).

Standard library only, so kafka-local can wait for the broker before any
virtual environment exists. Sends one Metadata request (API key 3, version 4,
which Kafka 2.x to 4.x all accept) and reads the broker list from the answer.
"""

from __future__ import annotations

import socket
import struct
import sys

METADATA_API_KEY = 3
METADATA_VERSION = 4
CORRELATION_ID = 7


def _request(client_id: bytes) -> bytes:
    header = struct.pack(
        ">hhih", METADATA_API_KEY, METADATA_VERSION, CORRELATION_ID, len(client_id)
    )
    # topics = null (all topics), allow_auto_topic_creation = false
    body = struct.pack(">i?", -1, False)
    payload = header + client_id + body
    return struct.pack(">i", len(payload)) + payload


def _read_exact(sock: socket.socket, size: int) -> bytes:
    chunks = bytearray()
    while len(chunks) < size:
        chunk = sock.recv(size - len(chunks))
        if not chunk:
            raise ConnectionError("broker closed the connection")
        chunks += chunk
    return bytes(chunks)


def broker_count(host: str, port: int, timeout_s: float) -> int:
    """Return how many brokers the metadata answer lists."""
    with socket.create_connection((host, port), timeout=timeout_s) as sock:
        sock.settimeout(timeout_s)
        sock.sendall(_request(b"kafka-local-probe"))
        (size,) = struct.unpack(">i", _read_exact(sock, 4))
        answer = _read_exact(sock, size)
    correlation_id, _throttle_ms, brokers = struct.unpack(">iii", answer[:12])
    if correlation_id != CORRELATION_ID:
        raise ConnectionError(f"unexpected correlation id {correlation_id}")
    return int(brokers)


def main() -> int:
    host, _, port = sys.argv[1].rpartition(":")
    try:
        count = broker_count(host or "127.0.0.1", int(port), timeout_s=2.0)
    except (OSError, struct.error) as exc:
        print(f"no metadata from {sys.argv[1]}: {exc}", file=sys.stderr)
        return 1
    wanted = int(sys.argv[2]) if len(sys.argv) > 2 else 1
    if count < wanted:
        print(f"{sys.argv[1]} lists {count} of {wanted} brokers", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
