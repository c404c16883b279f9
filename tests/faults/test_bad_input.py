"""Bad input against a real SmolLM2 worker and a real gateway in front of it. A 3.5 MB prompt
tokenizes off the event loop while health keeps answering; a request over --max-request-bytes is
refused with INVALID_ARGUMENT over gRPC and 413 over HTTP, before any tokenizing; undecodable
requests (invalid UTF-8) get INVALID_ARGUMENT and a rate-limited line without traceback; and a
hypothesis fuzzer over the public API (requests generated from the proto, and raw bytes) gets a
clear status for every request while both servers stay SERVING."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmesh.v1 import inference_pb2 as pb
from kvmesh.v1 import inference_pb2_grpc

from .conftest import Launcher, free_port, health, wait_serving
from .proto_strategies import message

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


def raw_call(channel: grpc.Channel, method: str, streaming: bool):
    identity = {"request_serializer": lambda b: b, "response_deserializer": lambda b: b}
    rpc = channel.unary_stream if streaming else channel.unary_unary
    return rpc(f"/kvmesh.v1.Inference/{method}", **identity)


def call_status(call, payload, streaming: bool) -> tuple[grpc.StatusCode, str, list]:
    try:
        out = list(call(payload, timeout=20)) if streaming else [call(payload, timeout=20)]
    except grpc.RpcError as e:
        return e.code(), e.details() or "", []
    return grpc.StatusCode.OK, "", out


def test_undecodable_requests_are_invalid_argument_with_few_log_lines(servers):
    worker, gateway, _ = servers
    bad_generate = pb.GenerateRequest(text="ab").SerializeToString().replace(b"ab", b"\xff\xfe")
    bad_tokenize = pb.TokenizeRequest(text="ab").SerializeToString().replace(b"ab", b"\xff\xfe")
    for process in (worker, gateway):
        with grpc.insecure_channel(process.address) as channel:
            generate, tokenize = raw_call(channel, "Generate", True), raw_call(channel, "Tokenize", False)
            for _ in range(100):
                for call, payload, streaming in (
                    (generate, bad_generate, True),
                    (tokenize, bad_tokenize, False),
                ):
                    code, details, _ = call_status(call, payload, streaming)
                    assert code == grpc.StatusCode.INVALID_ARGUMENT, (process.name, code, details)
                    assert "bad UTF-8" in details
        lines = [line for line in process.log().splitlines() if "malformed request" in line]
        assert 1 <= len(lines) <= 2, lines  # 200 refusals, one line (two if 10 s passed)
        assert "Traceback" not in process.log()


ALLOWED = {
    grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.OUT_OF_RANGE,
}  # fmt: skip
REQUESTS = st.one_of(
    st.tuples(st.just("Generate"), message(pb.GenerateRequest.DESCRIPTOR, pb.GenerateRequest)),
    st.tuples(st.just("Tokenize"), message(pb.TokenizeRequest.DESCRIPTOR, pb.TokenizeRequest)),
    st.tuples(st.sampled_from(["Generate", "Tokenize"]), st.binary(max_size=64)),
)


@pytest.fixture(scope="module")
def channels(servers):
    worker, gateway, _ = servers
    with grpc.insecure_channel(worker.address) as w, grpc.insecure_channel(gateway.address) as g:
        yield {"worker": w, "gateway": g}


@settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(request=REQUESTS, target=st.sampled_from(["worker", "gateway"]))
def test_fuzzed_requests_get_a_clear_status(channels, request, target):
    method, body = request
    if isinstance(body, pb.GenerateRequest) and not body.sampling.HasField("max_tokens"):
        body.sampling.max_tokens = 4  # the default (256 tokens) only costs CPU time here
    payload = body if isinstance(body, bytes) else body.SerializeToString()
    streaming = method == "Generate"
    code, details, out = call_status(raw_call(channels[target], method, streaming), payload, streaming)
    assert code in ALLOWED, (target, method, body, code, details)
    if code != grpc.StatusCode.OK:
        assert details, (target, method, body, code)
    elif streaming:
        final = pb.GenerateResponse.FromString(out[-1])
        assert final.finish_reason, (target, body, final)


def test_servers_survive_the_fuzzing(servers):
    """Runs after the fuzzer: both still SERVING, alive, and no traceback in either log."""
    for process in servers[:2]:
        assert process.proc.poll() is None, process.log()[-3000:]
        assert health(process.address) == health_pb2.HealthCheckResponse.SERVING
        assert "Traceback" not in process.log(), process.log()[-5000:]
