"""TLS everywhere, with certificates an openssl CA issues for the test: mutual TLS on both gRPC hops
(client -> gateway, gateway -> worker) and ``rediss://`` to a password-protected TLS redis-server.
A real SmolLM2 worker registers over TLS and requires client certificates, as does the gateway; a
client with one gets its generation, a client without one, or in plaintext, gets nothing. The OpenAI
HTTP fronts serve HTTPS with the same certificates."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import ssl
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import grpc
import pytest
from conftest import free_port, wait_for_port
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvmesh.gateway.server import Gateway, GatewayOptions
from kvmesh.tls import ClientTls, ServerTls
from kvmesh.v1 import inference_pb2 as pb
from kvmesh.v1 import inference_pb2_grpc

PASSWORD = "kvmesh-tls-redis-pw"
API_KEY = "sk-kvmesh-tls-test"

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


async def https(session, method: str, url: str, client: ssl.SSLContext, **kwargs) -> tuple[int, dict]:
    async with session.request(method, url, ssl=client, **kwargs) as response:
        return response.status, await response.json()


def client_context(files: dict[str, str], with_cert: bool = True) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=files["ca.crt"])
    if with_cert:
        context.load_cert_chain(files["client.crt"], files["client.key"])
    return context


async def wait_ready_https(session, url: str, context: ssl.SSLContext, proc, timeout_s: float = 240) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if (await https(session, "GET", url, context))[0] == 200:
                return
        except aiohttp.ClientError:
            pass
        assert proc.poll() is None, "the process exited"
        assert time.monotonic() < deadline, f"{url} not ready in time"
        await asyncio.sleep(0.3)


async def cli(*args: str, api_key: str = "", stdin: bytes = b"") -> tuple[int, str]:
    """``kvmesh <args>`` as a process: (exit code, stdout + stderr)."""
    env = {k: v for k, v in os.environ.items() if k != "KVMESH_API_KEY"}
    env |= {"KVMESH_API_KEY": api_key} if api_key else {}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "kvmesh.cli", *args, env=env, stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(stdin), 120)
    return proc.returncode, out.decode(errors="replace")


async def test_http_fronts_serve_https_with_the_grpc_certificate(worker_launcher, tmp_path):
    """The OpenAI HTTP fronts of a real worker (mutual TLS) and a real gateway process (TLS, API
    keys) serve HTTPS only: plain HTTP gets no answer; under mutual TLS the API needs a client
    certificate the CA signed (none: 401; one from another CA: no handshake), while /health and
    /ready, what the kubelet's HTTPS probes ask, stay open. ``kvmesh generate`` and ``kvmesh chat``
    reach both over TLS, presenting a client certificate and an API key (from env) when asked."""
    files = issue(tmp_path)
    (tmp_path / "other").mkdir()
    foreign = issue(tmp_path / "other")  # another CA, and a client certificate it signed
    http_port = free_port()
    mtls = ["--tls-cert", files["server.crt"], "--tls-key", files["server.key"]]
    mtls += ["--tls-client-ca", files["ca.crt"], "--http-port", str(http_port)]
    worker = worker_launcher.start("w-https", deployment="https", extra=mtls, wait=False)
    gateway_http, gateway_grpc = free_port(), free_port()
    keys = tmp_path / "api-keys.json"
    keys.write_text(json.dumps({API_KEY: {"tenant": "acme"}}))
    gateway = subprocess.Popen(
        [
            sys.executable, "-m", "kvmesh.cli", "gateway", "--host", "127.0.0.1",
            "--port", str(gateway_grpc), "--http-port", str(gateway_http), "--worker", worker.address,
            "--tls-cert", files["server.crt"], "--tls-key", files["server.key"],
            "--worker-tls-ca", files["ca.crt"], "--worker-tls-cert", files["client.crt"],
            "--worker-tls-key", files["client.key"], "--worker-tls-server-name", "kvmesh-worker",
            "--api-keys-file", str(keys),
        ],
        stdout=subprocess.DEVNULL, stderr=(tmp_path / "gateway.log").open("wb"),
    )  # fmt: skip
    with_cert, without_cert = client_context(files), client_context(files, with_cert=False)
    foreign_client = client_context({**foreign, "ca.crt": files["ca.crt"]})
    body = {"prompt": "The capital of France is", "max_tokens": 3}
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
            w = f"https://127.0.0.1:{http_port}"
            await wait_ready_https(session, f"{w}/ready", without_cert, worker.proc)
            assert (await https(session, "GET", f"{w}/health", without_cert))[0] == 200
            status, error = await https(session, "GET", f"{w}/v1/models", without_cert)
            assert status == 401 and "client certificate" in error["error"]["message"]
            status, answer = await https(session, "POST", f"{w}/v1/completions", with_cert, json=body)
            assert status == 200 and answer["usage"]["completion_tokens"] == 3, answer
            with pytest.raises(aiohttp.ClientError):  # the handshake refuses a foreign certificate
                await https(session, "GET", f"{w}/v1/models", foreign_client)

            g = f"https://127.0.0.1:{gateway_http}"
            await wait_ready_https(session, f"{g}/ready", without_cert, gateway)
            # TLS without a client CA: no client certificate needed; the hop to the worker is mTLS.
            status, answer = await https(session, "POST", f"{g}/v1/completions", without_cert, json=body)
            assert status == 401, answer  # API keys: a key is needed
            auth = {"Authorization": f"Bearer {API_KEY}"}
            status, answer = await https(
                session, "POST", f"{g}/v1/completions", without_cert, json=body, headers=auth
            )
            assert status == 200 and answer["usage"]["completion_tokens"] == 3, answer
            for url in (f"http://127.0.0.1:{http_port}/health", f"http://127.0.0.1:{gateway_http}/health"):
                with pytest.raises(aiohttp.ClientError):  # plain HTTP to a TLS port: no answer
                    async with session.get(url) as response:
                        await response.read()
            with pytest.raises(aiohttp.ClientError):  # a client that checks the server: it must
                await https(session, "GET", f"{g}/health", ssl.create_default_context())
        # The command-line clients: over TLS, with the API key from env (never argv).
        to_gateway = ["--target", f"127.0.0.1:{gateway_grpc}", "--tls-ca", files["ca.crt"]]
        prompt = ["--raw", "--max-tokens", "3", "The capital of France is"]
        code, out = await cli("generate", *to_gateway, *prompt, api_key=API_KEY)
        assert code == 0 and "completion_tokens=3" in out, out
        code, out = await cli("generate", *to_gateway, *prompt)
        assert code == 1 and "UNAUTHENTICATED" in out, out
        code, out = await cli("generate", "--target", f"127.0.0.1:{gateway_grpc}", *prompt, api_key=API_KEY)
        assert code == 2 and "only over TLS" in out, out  # a bearer key never goes out in plaintext
        code, out = await cli(
            "chat", *to_gateway, "--max-tokens", "3", api_key=API_KEY, stdin=b"Hello\n/exit\n"
        )
        assert code == 0 and out.strip(), out
        to_worker = ["--target", worker.address, "--tls-ca", files["ca.crt"]]
        client_cert = ["--tls-cert", files["client.crt"], "--tls-key", files["client.key"]]
        code, out = await cli("generate", *to_worker, *client_cert, *prompt)
        assert code == 0 and "completion_tokens=3 " in out and "worker=w-https" in out, out
        code, out = await cli("generate", *to_worker, *prompt)  # mTLS: no certificate, no answer
        assert code == 1 and "no TLS session" in out, out
    finally:
        gateway.terminate()
        gateway.wait(30)
    assert "Traceback" not in (tmp_path / "gateway.log").read_text() + worker.log()
