#!/usr/bin/env python3
"""Download the broker's jars listed in jars.lock from Maven Central, without Maven.

    fetch_jars.py LOCK DIR                 fetch what LOCK lists into DIR
    fetch_jars.py --write-lock LIST DIR LOCK
                                           write LOCK from `mvn dependency:list`'s
                                           LIST and the jars mvn copied into DIR

Standard library only, so that the demo needs Python and Java and nothing else.
Every jar is checked against its SHA-256 in the lock before it is kept; a jar
already in DIR with the right digest is not downloaded again. The repository is
Maven Central unless SCM_RELAY_MAVEN_REPO names a mirror (same layout).
Jars in DIR that the lock does not list (an older version's) are deleted, so
the broker's class path is exactly the lock. Exit 0 when DIR holds every jar,
1 with a message naming what failed.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

CENTRAL = "https://repo1.maven.org/maven2"
TIMEOUT_S = 60
ATTEMPTS = 3


def read_lock(lock: Path) -> list[tuple[str, str, str, str]]:
    """(group, artifact, version, sha256) for each line of the lock."""
    entries = []
    for number, line in enumerate(lock.read_text().splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            coordinates, digest = line.split()
            group, artifact, version = coordinates.split(":")
        except ValueError:
            problem = f"{lock}:{number}: not 'group:artifact:version sha256': {line}"
            raise SystemExit(problem) from None
        entries.append((group, artifact, version, digest))
    return entries


def sha256(path: Path) -> str:
    with path.open("rb") as stream:
        return hashlib.file_digest(stream, "sha256").hexdigest()


def fetch(url: str, target: Path, digest: str) -> None:
    """Download `url` to `target` (atomically), checking its digest; retries twice."""
    last = ""
    for _ in range(ATTEMPTS):
        with tempfile.NamedTemporaryFile(dir=target.parent, delete=False) as partial:
            try:
                with urllib.request.urlopen(url, timeout=TIMEOUT_S) as answer:  # noqa: S310
                    while chunk := answer.read(1 << 20):
                        partial.write(chunk)
            except (urllib.error.URLError, OSError) as exc:
                last = str(exc)
                Path(partial.name).unlink(missing_ok=True)
                continue
        got = sha256(Path(partial.name))
        if got != digest:
            last = f"SHA-256 {got}, the lock says {digest}"
            Path(partial.name).unlink(missing_ok=True)
            continue
        Path(partial.name).chmod(0o644)
        Path(partial.name).replace(target)
        return
    raise SystemExit(f"could not fetch {url}: {last}")


LOCK_HEADER = """\
# The Kafka broker's runtime jars (org.apache.kafka:kafka_2.13 of pom.xml and its
# runtime dependencies), each with its SHA-256: fetch_jars.py downloads them from
# Maven Central without Maven. `kafka-local lock` writes this file again with mvn.
# group:artifact:version sha256
"""


def write_lock(listing: Path, directory: Path, lock: Path) -> int:
    lines = []
    for line in listing.read_text().splitlines():
        parts = line.strip().split(":")
        if len(parts) == 5 and parts[2] == "jar":
            group, artifact, _type, version, _scope = parts
            digest = sha256(directory / f"{artifact}-{version}.jar")
            lines.append(f"{group}:{artifact}:{version} {digest}")
    lock.write_text(LOCK_HEADER + "\n".join(sorted(lines)) + "\n")
    return 0


def main() -> int:
    if len(sys.argv) == 5 and sys.argv[1] == "--write-lock":
        return write_lock(Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]))
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    lock, directory = Path(sys.argv[1]), Path(sys.argv[2])
    directory.mkdir(parents=True, exist_ok=True)
    repository = os.environ.get("SCM_RELAY_MAVEN_REPO", CENTRAL).rstrip("/")
    entries = read_lock(lock)
    for count, (group, artifact, version, digest) in enumerate(entries, start=1):
        name = f"{artifact}-{version}.jar"
        target = directory / name
        if target.exists() and sha256(target) == digest:
            continue
        url = f"{repository}/{group.replace('.', '/')}/{artifact}/{version}/{name}"
        print(f"fetch_jars: [{count}/{len(entries)}] {name}", file=sys.stderr)
        fetch(url, target, digest)
    listed = {f"{artifact}-{version}.jar" for _group, artifact, version, _digest in entries}
    for stale in directory.glob("*.jar"):
        if stale.name not in listed:
            stale.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
