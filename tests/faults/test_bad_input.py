"""Large requests against a real SmolLM2 worker and a real gateway in front of it: a 3.5 MB prompt
tokenizes off the event loop while health keeps answering, and a request over --max-request-bytes
is refused with INVALID_ARGUMENT over gRPC and 413 over HTTP, before any tokenizing."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvmesh.v1 import inference_pb2 as pb
from kvmesh.v1 import inference_pb2_grpc

from .conftest import Launcher, free_port, wait_serving

pytestmark = [pytest.mark.integration, pytest.mark.faults, pytest.mark.slow, pytest.mark.timeout(300)]

LIMIT = 4 * 1024 * 1024
BIG = ("The quick brown fox jumps over the lazy dog. " * 80000)[:3_500_000]  # under LIMIT
HUGE = BIG + BIG[:1_500_000]  # 5 MB: over LIMIT, under gRPC's own limit (LIMIT + 1 MiB)


@pytest.fixture(scope="module")
def servers(launcher: Launcher):
    http_port = free_port()
    limit = ["--max-request-bytes", str(LIMIT)]
    worker = launcher.worker(
        "w-big", "faults-big", launcher.env(None), extra=[*limit, "--http-port", str(http_port)]
    )
    wait_serving(worker)
    gateway = launcher.gateway(
        "gw-big", "faults-big", launcher.env(None), extra=[*limit, "--worker", worker.address]
    )
    wait_serving(gateway, 30)
    return worker, gateway, http_port


async def test_health_answers_while_a_big_prompt_tokenizes(servers):
    worker, _, _ = servers
    async with grpc.aio.insecure_channel(worker.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        big = inference_pb2_grpc.InferenceStub(channel).Tokenize(pb.TokenizeRequest(text=BIG), timeout=120)
        task = asyncio.ensure_future(big)
        latencies = []
        started = time.monotonic()
        while not task.done():
            t0 = time.perf_counter()
            reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=10)
            latencies.append(time.perf_counter() - t0)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            await asyncio.sleep(0.05)
        tokenize_s = time.monotonic() - started
        ids = (await task).token_ids
    latencies.sort()
    worst, p50 = latencies[-1], latencies[len(latencies) // 2]
    print(f"tokenize 3.5 MB: {tokenize_s:.1f}s, {len(ids)} tokens; health checks={len(latencies)} "
          f"p50={p50 * 1000:.1f}ms max={worst * 1000:.1f}ms")  # fmt: skip
    assert len(ids) > 500_000
    assert tokenize_s > 1.0 and len(latencies) >= 10, "the checks should overlap the tokenizing"
    assert worst < 1.0, f"a health check waited {worst:.2f}s behind the tokenizer"


async def test_oversize_requests_are_refused_with_the_limit(servers):
    worker, gateway, http_port = servers
    for address in (worker.address, gateway.address):
        async with grpc.aio.insecure_channel(address) as channel:
            stub = inference_pb2_grpc.InferenceStub(channel)
            for name in ("Generate", "Tokenize"):
                started = time.monotonic()
                with pytest.raises(grpc.aio.AioRpcError) as error:
                    if name == "Generate":
                        await stub.Generate(pb.GenerateRequest(text=HUGE), timeout=30).read()
                    else:
                        await stub.Tokenize(pb.TokenizeRequest(text=HUGE), timeout=30)
                assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (address, name)
                details = error.value.details()
                assert f"at most {LIMIT}" in details and "--max-request-bytes" in details
                assert time.monotonic() - started < 2.0, "refused before tokenizing"
    body = json.dumps({"model": "SmolLM2-135M-Instruct", "prompt": HUGE, "max_tokens": 1}).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{http_port}/v1/completions",
        data=body,
        headers={"Content-Type": "application/json"},
    )
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(request, timeout=30)
    assert error.value.code == 413
    assert "--max-request-bytes" in json.loads(error.value.read())["error"]["message"]

