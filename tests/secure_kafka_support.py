"""A second local broker with SASL and TLS listeners, and the test CA it trusts.

The CA, the broker's certificate and a client certificate are made fresh for each
test session with the `openssl` command line tool, so no key is ever committed.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from devkit.harness import kafka_local, start_broker, stop_broker

USER = "relay-test"
PASSWORD = "relay-test-secret"  # a throwaway credential for a loopback broker


@dataclass(frozen=True)
class TestCertificates:
    """PEM files of a throwaway CA, and a client certificate and key it signed."""

    ca: Path
    client_cert: Path
    client_key: Path
    other_ca: Path  # a CA nobody used: trusting only it must fail verification


@dataclass(frozen=True)
class SecureBroker:
    listeners: dict[str, str]  # security protocol -> host:port
    certificates: TestCertificates


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _make_ca(directory: Path, name: str) -> None:
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-noenc", "-days", "2",
        "-subj", f"/CN=scm-relay test CA {name}",
        "-keyout", f"{name}.key", "-out", f"{name}.pem",
        cwd=directory,
    )  # fmt: skip


def _sign(directory: Path, name: str, subject: str, extensions: str) -> None:
    """A key (unencrypted PKCS#8) and a certificate for it signed by the `ca` CA."""
    (directory / f"{name}.ext").write_text(extensions)
    _openssl(
        "req", "-new", "-newkey", "rsa:2048", "-noenc", "-subj", subject,
        "-keyout", f"{name}.key", "-out", f"{name}.csr",
        cwd=directory,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-CAcreateserial", "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.crt",
        cwd=directory,
    )  # fmt: skip


def make_certificates(directory: Path) -> TestCertificates:
    """A CA, a broker certificate for 127.0.0.1/localhost and a client certificate."""
    directory.mkdir(parents=True, exist_ok=True)
    _make_ca(directory, "ca")
    _make_ca(directory, "other-ca")
    _sign(
        directory,
        "broker",
        "/CN=localhost",
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
    )
    _sign(directory, "client", f"/CN={USER}", "extendedKeyUsage=clientAuth\n")
    # Kafka's PEM key store: the private key and the certificate chain in one file.
    (directory / "broker.pem").write_text(
        (directory / "broker.key").read_text() + (directory / "broker.crt").read_text()
    )
    (directory / "users").write_text(f"{USER}:{PASSWORD}\n")
    return TestCertificates(
        ca=directory / "ca.pem",
        client_cert=directory / "client.crt",
        client_key=directory / "client.key",
        other_ca=directory / "other-ca.pem",
    )


@contextmanager
def secure_broker(directory: Path) -> Iterator[SecureBroker]:
    """Start a broker of its own (own run dir, own ports) with the secure listeners."""
    certificates = make_certificates(directory / "tls")
    run_dir = directory / "run"
    env = {"SCM_RELAY_KAFKA_SECURE_DIR": str(directory / "tls"), "SCM_RELAY_KAFKA_HEAP": "512m"}

    try:
        start_broker(run_dir, env=env)
        listeners = {
            protocol: kafka_local(run_dir, "address", protocol).stdout.strip()
            for protocol in ("PLAINTEXT", "SASL_PLAINTEXT", "SASL_SSL", "SSL")
        }
        yield SecureBroker(listeners, certificates)
    finally:
        stop_broker(run_dir)
