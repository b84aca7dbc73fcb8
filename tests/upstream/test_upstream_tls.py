"""https targets: TLS with the system's default verification."""

from __future__ import annotations

import shutil
import ssl
import subprocess
from pathlib import Path

import pytest

from wasm_gateway.exceptions import UpstreamConnectError
from wasm_gateway.upstream import Target

from .conftest import Pools
from .origins import Origin, echo, keep_alive

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


async def start_tls_origin(cert: Path, key: Path) -> Origin:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return await Origin(keep_alive(echo)).start(ssl=context)


async def test_https_target(
    pools: Pools, certificate: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    cert, key = certificate
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # the default context trusts our self-signed certificate
    origin = await start_tls_origin(cert, key)
    try:
        pool = pools.make(Target("127.0.0.1", origin.port, "https"))
        for i in range(2):
            async with await pool.request("GET", f"/{i}", [(b"host", b"x")], None, idempotent=True) as resp:
                assert await resp.read() == f"GET /{i} conn=0 body=0".encode()
        await pool.close()
    finally:
        await origin.close()


async def test_untrusted_certificate(pools: Pools, certificate: tuple[Path, Path]) -> None:
    origin = await start_tls_origin(*certificate)
    try:
        pool = pools.make(Target("127.0.0.1", origin.port, "https"), retries=0)
        with pytest.raises(UpstreamConnectError, match="TLS handshake failed"):
            await pool.request("GET", "/", [(b"host", b"x")], None, idempotent=True)
        await pool.close()
    finally:
        await origin.close()
