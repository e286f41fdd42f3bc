"""The API client's TLS and URLs against real loopback servers: a CA file adds to the
system's trusted CAs, a certificate for another host name is refused, and data put in
a URL path stays one path segment.

The certificates are made for each run with the `openssl` command line tool; the
"system" trust store is replaced for the test by one CA through OpenSSL's
`SSL_CERT_FILE` and `SSL_CERT_DIR`, so the machine's own CAs play no part.
"""

from __future__ import annotations

import ssl
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiohttp import web

from service.scantrust.outcomes import Rejected, Unavailable
from tests.api_support import client


def openssl(directory: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True, timeout=60)


def make_ca(directory: Path, name: str) -> Path:
    openssl(
        directory, "req", "-x509", "-newkey", "rsa:2048", "-noenc", "-days", "2",
        "-subj", f"/CN=scm-relay test CA {name}", "-keyout", f"{name}.key", "-out", f"{name}.pem",
    )  # fmt: skip
    return directory / f"{name}.pem"


def make_server_cert(directory: Path, name: str, ca: str, alt_names: str) -> tuple[Path, Path]:
    (directory / f"{name}.ext").write_text(
        f"subjectAltName={alt_names}\nextendedKeyUsage=serverAuth\n"
    )
    openssl(
        directory, "req", "-new", "-newkey", "rsa:2048", "-noenc", "-subj", f"/CN={name}",
        "-keyout", f"{name}.key", "-out", f"{name}.csr",
    )  # fmt: skip
    openssl(
        directory, "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey",
        f"{ca}.key", "-CAcreateserial", "-days", "2", "-extfile", f"{name}.ext",
        "-out", f"{name}.crt",
    )  # fmt: skip
    return directory / f"{name}.crt", directory / f"{name}.key"


@dataclass(frozen=True)
class Certificates:
    private_ca: Path  # what SCM_RELAY_API_CA_FILE names
    system_ca: Path  # the stand-in for the system's trust store
    directory: Path


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    directory = tmp_path_factory.mktemp("api-tls")
    private_ca = make_ca(directory, "private")
    system_ca = make_ca(directory, "system")
    make_server_cert(directory, "right", "private", "IP:127.0.0.1,DNS:localhost")
    make_server_cert(directory, "wrong", "private", "DNS:api.wrong.example")
    make_server_cert(directory, "public", "system", "IP:127.0.0.1,DNS:localhost")
    return Certificates(private_ca, system_ca, directory)


@pytest.fixture
def system_trust(certificates: Certificates, monkeypatch: pytest.MonkeyPatch) -> None:
    """OpenSSL's default trust store is the `system` CA alone for this test."""
    empty = certificates.directory / "no-ca-dir"
    empty.mkdir(exist_ok=True)
    monkeypatch.setenv("SSL_CERT_FILE", str(certificates.system_ca))
    monkeypatch.setenv("SSL_CERT_DIR", str(empty))


@asynccontextmanager
async def api_server(
    certificates: Certificates | None, name: str
) -> AsyncIterator[tuple[str, list[str]]]:
    """An API stand-in on loopback (HTTPS with `name`'s certificate, or plain HTTP): its
    base URL and the raw paths it was asked for."""
    asked: list[str] = []

    async def answer(request: web.Request) -> web.Response:
        asked.append(request.raw_path)
        if request.raw_path == "/api/v2/me/":
            return web.json_response({"username": "relay"})
        return web.json_response({"detail": "Not found."}, status=404)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    runner = web.AppRunner(app)
    await runner.setup()
    context = None
    if certificates is not None:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(
            certificates.directory / f"{name}.crt", certificates.directory / f"{name}.key"
        )
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    scheme = "https" if context else "http"
    try:
        yield f"{scheme}://127.0.0.1:{port}", asked
    finally:
        await runner.cleanup()


async def test_the_ca_file_adds_to_the_system_trust_store(
    certificates: Certificates, system_trust: None
) -> None:
    """With SCM_RELAY_API_CA_FILE set, an API whose certificate a system CA signed (a
    public API behind no proxy) is still trusted, and so is one the file's CA signed."""
    for name in ("public", "right"):
        async with (
            api_server(certificates, name) as (base_url, _asked),
            client(base_url, ca_file=certificates.private_ca) as api,
        ):
            answer = await api.me(retry=False)
        assert answer == {"username": "relay"}, (name, answer)


async def test_without_a_ca_file_only_the_system_trust_store_counts(
    certificates: Certificates, system_trust: None
) -> None:
    async with api_server(certificates, "right") as (base_url, _asked), client(base_url) as api:
        refused = await api.me(retry=False)
    assert isinstance(refused, Unavailable)
    assert "certificate verify failed" in refused.reason


async def test_a_certificate_for_another_host_name_is_refused(
    certificates: Certificates, system_trust: None
) -> None:
    """Signed by the trusted CA, but for api.wrong.example, not 127.0.0.1."""
    async with (
        api_server(certificates, "wrong") as (base_url, asked),
        client(base_url, ca_file=certificates.private_ca) as api,
    ):
        refused = await api.me(retry=False)
    assert isinstance(refused, Unavailable)
    assert "certificate verify failed" in refused.reason
    assert "mismatch" in refused.reason.lower()
    assert asked == [], "nothing may be sent (the token least of all)"


async def test_data_in_a_url_path_stays_one_segment() -> None:
    async with api_server(None, "") as (base_url, asked), client(base_url) as api:
        task = await api.task("a/b?c=1#d%e")
        group = await api.task_group("../me")
        dots = [await api.task(text) for text in ("..", ".", "")]
    assert isinstance(task, Rejected)
    assert task.status == 404
    assert isinstance(group, Rejected)
    assert asked == [
        "/api/v2/scm/tasks/a%2Fb%3Fc=1%23d%25e/",  # `=` may stand in a segment
        "/api/v2/scm/task-groups/..%2Fme/",
    ]
    # "." and ".." would be resolved into another path even encoded: never sent.
    for text, answer in zip(("..", ".", ""), dots, strict=True):
        assert isinstance(answer, Rejected)
        assert answer.status == 404
        assert f"no task id can be {text!r}" in answer.errors["detail"]
