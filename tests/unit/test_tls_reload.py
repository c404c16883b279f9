"""Renewed certificates without a restart: cert-manager renews a Secret in place and the kubelet
swaps the mounted files; the gRPC port serves the new certificate from the next connection on, the
HTTP front within its check period, and files that do not load leave the current certificate in
place. Real servers on loopback, certificates from an openssl CA, handshakes by Python's ssl."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import ssl
import subprocess
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from kvmesh.openai_http import OpenAIServer
from kvmesh.tls import ClientTls, ServerTls

pytestmark = pytest.mark.timeout(120)


def openssl(tmp: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=tmp, check=True, capture_output=True)


def issue(tmp: Path, names: tuple[str, ...]) -> None:
    """ca.crt, and for each name <name>.crt/<name>.key (CN=<name>, valid for 127.0.0.1)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl(tmp, "req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "1", "-subj", "/CN=ca")
    (tmp / "san.ext").write_text("subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    for name in names:
        openssl(tmp, "req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}")
        openssl(tmp, "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                "-CAcreateserial", "-out", f"{name}.crt", "-days", "1", "-extfile", "san.ext")  # fmt: skip


def install(tmp: Path, name: str) -> None:
    """Puts <name>'s pair in place as the kubelet does: whole files renamed over the old ones."""
    for suffix in ("crt", "key"):
        staged = tmp / f"staged.{suffix}"
        shutil.copyfile(tmp / f"{name}.{suffix}", staged)
        os.replace(staged, tmp / f"tls.{suffix}")


def served_name(port: int, ca: Path, alpn: str) -> str:
    """The CN of the certificate a fresh TLS connection to ``port`` is shown."""
    context = ssl.create_default_context(cafile=str(ca))
    context.set_alpn_protocols([alpn])
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        subject = dict(item[0] for item in tls.getpeercert()["subject"])
    return subject["commonName"]


class Health:
    """What the HTTP front's /health and /ready ask: nothing here, the handshake is under test."""

    async def alive(self) -> bool:
        return True

    async def ready(self) -> bool:
        return True


async def eventually(check, timeout_s: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not await asyncio.to_thread(check):
        assert asyncio.get_running_loop().time() < deadline, "not reloaded in time"
        await asyncio.sleep(0.1)


async def test_servers_pick_up_renewed_certificates(tmp_path: Path) -> None:
    issue(tmp_path, ("first", "second"))
    install(tmp_path, "first")
    tls = ServerTls(str(tmp_path / "tls.crt"), str(tmp_path / "tls.key"))
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    grpc_port = server.add_secure_port("127.0.0.1:0", tls.credentials())
    await server.start()
    http = OpenAIServer(Health(), tls=tls)
    http.certificate_check_s = 0.1
    http_port = await http.start("127.0.0.1", 0)
    ca = tmp_path / "ca.crt"
    try:
        assert await asyncio.to_thread(served_name, grpc_port, ca, "h2") == "first"
        assert await asyncio.to_thread(served_name, http_port, ca, "http/1.1") == "first"

        install(tmp_path, "second")
        # gRPC: the very next connection; HTTP: within its check period.
        assert await asyncio.to_thread(served_name, grpc_port, ca, "h2") == "second"
        await eventually(lambda: served_name(http_port, ca, "http/1.1") == "second")
        async with ClientTls(ca=str(ca)).channel(f"127.0.0.1:{grpc_port}", []) as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            )
            assert reply.status == health_pb2.HealthCheckResponse.SERVING

        # A certificate that does not match its key (or does not parse) is not taken.
        shutil.copyfile(tmp_path / "first.crt", tmp_path / "staged.crt")
        os.replace(tmp_path / "staged.crt", tmp_path / "tls.crt")
        await asyncio.sleep(0.5)  # several HTTP checks
        assert await asyncio.to_thread(served_name, grpc_port, ca, "h2") == "second"
        assert await asyncio.to_thread(served_name, http_port, ca, "http/1.1") == "second"
    finally:
        await http.stop()
        await server.stop(0)
