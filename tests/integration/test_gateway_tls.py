"""TLS everywhere, with certificates an openssl CA issues for the test: mutual TLS on both gRPC hops
(client -> gateway, gateway -> worker) and ``rediss://`` to a password-protected TLS redis-server.
A real SmolLM2 worker registers over TLS and requires client certificates, as does the gateway; a
client with one gets its generation, a client without one, or in plaintext, gets nothing."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from pathlib import Path

import grpc
import pytest
from conftest import free_port, wait_for_port
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvmesh.gateway.server import Gateway, GatewayOptions
from kvmesh.tls import ClientTls, ServerTls
from kvmesh.v1 import inference_pb2 as pb
from kvmesh.v1 import inference_pb2_grpc

PASSWORD = "kvmesh-tls-redis-pw"

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(300)]


def issue(tmp: Path) -> dict[str, str]:
    """A CA, a server certificate (the workers' Service name, 127.0.0.1) and a client one."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=tmp, check=True, capture_output=True)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run(
        "req",
        "-x509",
        *ec,
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "1",
        "-subj",
        "/CN=kvmesh-test-ca",
    )
    exts = {
        "server": "subjectAltName=DNS:kvmesh-worker,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
        "client": "subjectAltName=DNS:kvmesh-client\nextendedKeyUsage=clientAuth\n",
    }
    for name, ext in exts.items():
        (tmp / f"{name}.ext").write_text(ext)
        run("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN=kvmesh-{name}")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{name}.crt", "-days", "1", "-extfile", f"{name}.ext")  # fmt: skip
    return {n: str(tmp / n) for n in ("ca.crt", "server.crt", "server.key", "client.crt", "client.key")}


async def serving(channel: grpc.aio.Channel, timeout_s: float = 240) -> None:
    deadline = time.monotonic() + timeout_s
    stub = health_pb2_grpc.HealthStub(channel)
    while True:
        try:
            reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=2)
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.aio.AioRpcError:
            pass
        assert time.monotonic() < deadline, "not SERVING in time"
        await asyncio.sleep(0.2)


async def generate(channel: grpc.aio.Channel) -> pb.GenerateResponse:
    request = pb.GenerateRequest(text="The capital of France is", sampling=pb.SamplingParams(max_tokens=3))
    responses = [r async for r in inference_pb2_grpc.InferenceStub(channel).Generate(request, timeout=60)]
    return responses[-1]


def tls_redis(files: dict[str, str], tmp: Path) -> tuple[subprocess.Popen, str]:
    """A redis-server speaking only TLS, with a password; returns it and its rediss:// URL."""
    port = free_port()
    config = tmp / "redis.conf"
    config.write_text(
        f'port 0\ntls-port {port}\nbind 127.0.0.1\nsave ""\nappendonly no\ndir {tmp}\n'
        f"tls-cert-file {files['server.crt']}\ntls-key-file {files['server.key']}\n"
        f"tls-ca-cert-file {files['ca.crt']}\ntls-auth-clients no\nrequirepass {PASSWORD}\n"
    )
    proc = subprocess.Popen(["redis-server", str(config)], stdout=subprocess.DEVNULL)
    wait_for_port(port, 10, proc)
    return proc, f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={files['ca.crt']}"


async def test_mutual_tls_on_both_hops_and_rediss(worker_launcher, tmp_path, monkeypatch):
    files = issue(tmp_path)
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    monkeypatch.setenv("KVMESH_REDIS_PASSWORD", PASSWORD)  # for the worker process and this gateway
    redis, redis_url = tls_redis(files, tmp_path)
    try:
        await run_tls(worker_launcher, files, redis_url)
    finally:
        redis.kill()
        redis.wait(10)


async def run_tls(worker_launcher, files: dict[str, str], redis_url: str) -> None:
    mtls = ["--tls-cert", files["server.crt"], "--tls-key", files["server.key"]]
    mtls += ["--tls-client-ca", files["ca.crt"]]
    worker = worker_launcher.start("w-tls", redis_url=redis_url, deployment="tls", extra=mtls, wait=False)
    client = ClientTls(ca=files["ca.crt"], cert=files["client.crt"], key=files["client.key"])
    async with client.channel(worker.address, []) as channel:
        await serving(channel)  # SERVING only once registered: over rediss:// with the password
        assert (await generate(channel)).usage.completion_tokens == 3  # the worker itself, over mTLS

    gateway = Gateway(
        GatewayOptions(
            port=0, redis_url=redis_url, deployment="tls", shutdown_grace=1,
            tls=ServerTls(files["server.crt"], files["server.key"], files["ca.crt"]),
            worker_tls=ClientTls(files["ca.crt"], files["client.crt"], files["client.key"], "kvmesh-worker"),
        )
    )  # fmt: skip
    await gateway.start()
    try:
        assert await gateway.wait_for_workers(1, 30) == 1
        async with client.channel(gateway.address, []) as channel:
            final = await generate(channel)
            assert final.usage.completion_tokens == 3 and final.worker_id == "w-tls"
        refused = {
            "plaintext": grpc.aio.insecure_channel(gateway.address),
            "no client certificate": ClientTls(ca=files["ca.crt"]).channel(gateway.address, []),
            "worker without client certificate": ClientTls(ca=files["ca.crt"]).channel(worker.address, []),
        }
        for name, channel in refused.items():
            async with channel:
                with pytest.raises(grpc.aio.AioRpcError) as error:
                    await generate(channel)
                assert error.value.code() == grpc.StatusCode.UNAVAILABLE, name
    finally:
        await gateway.stop(1)
