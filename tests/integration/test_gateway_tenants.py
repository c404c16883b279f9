"""API keys and tenants at the gateway: two gateway replicas sharing a real redis-server in front of a
real SmolLM2 worker. A missing or unknown key is UNAUTHENTICATED (HTTP 401); a tenant's requests and
tokens per minute are counted across both replicas (RESOURCE_EXHAUSTED, HTTP 429); a tenant's cache
salt separates its prefix cache from another tenant's whatever the request asks for."""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import grpc
import pytest

from kvmesh.gateway.server import Gateway, GatewayOptions
from kvmesh.v1 import inference_pb2 as pb
from kvmesh.v1 import inference_pb2_grpc

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(300)]

DEPLOYMENT = "tenants"
KEYS = {
    "key-a": {"tenant": "a", "requests_per_minute": 3},
    "key-b": {"tenant": "b", "tokens_per_minute": 1},
    "key-c": {"tenant": "c", "cache_salt": "salt-c"},
    "key-d": {"tenant": "d", "cache_salt": "salt-d"},
}
SYSTEM = "You are a careful assistant. " + " ".join(f"Rule {i}: be brief and exact." for i in range(12))


def chat(question: str, salt: str = "") -> pb.GenerateRequest:
    messages = [pb.ChatMessage(role="system", content=SYSTEM), pb.ChatMessage(role="user", content=question)]
    return pb.GenerateRequest(
        chat=pb.ChatInput(messages=messages),
        sampling=pb.SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True),
        cache_salt=salt,
    )


async def generate(gateway: Gateway, key: str | None, request: pb.GenerateRequest) -> pb.GenerateResponse:
    metadata = (("authorization", f"Bearer {key}"),) if key else ()
    async with grpc.aio.insecure_channel(gateway.address) as channel:
        call = inference_pb2_grpc.InferenceStub(channel).Generate(request, timeout=60, metadata=metadata)
        return [r async for r in call][-1]


async def code_of(gateway: Gateway, key: str | None, request: pb.GenerateRequest) -> grpc.StatusCode:
    try:
        await generate(gateway, key, request)
    except grpc.aio.AioRpcError as e:
        return e.code()
    return grpc.StatusCode.OK


async def test_api_keys_tenants_and_limits_across_replicas(worker_launcher, redis_server, tmp_path):
    keys_file = tmp_path / "keys.json"
    keys_file.write_text(json.dumps(KEYS))
    worker = worker_launcher.start("w-tenants", redis_url=redis_server.url, deployment=DEPLOYMENT)
    options = dict(port=0, redis_url=redis_server.url, deployment=DEPLOYMENT, shutdown_grace=1,
                   api_keys_file=str(keys_file))  # fmt: skip
    a, b = Gateway(GatewayOptions(**options, http_port=0)), Gateway(GatewayOptions(**options))
    await a.start()
    await b.start()
    try:
        assert await a.wait_for_workers(1, 30) == 1
        if time.time() % 60 > 40:  # the limits count per clock minute: start the test inside one
            await asyncio.sleep(60 - time.time() % 60 + 0.5)

        assert await code_of(a, None, chat("Hi?")) == grpc.StatusCode.UNAUTHENTICATED
        assert await code_of(b, "key-x", chat("Hi?")) == grpc.StatusCode.UNAUTHENTICATED

        codes = [await code_of(g, "key-a", chat(f"Question {i}?")) for i, g in enumerate((a, b, a, b))]
        assert codes == [grpc.StatusCode.OK] * 3 + [grpc.StatusCode.RESOURCE_EXHAUSTED]

        assert await code_of(a, "key-b", chat("First?")) == grpc.StatusCode.OK  # spends its tokens
        assert await code_of(b, "key-b", chat("Second?")) == grpc.StatusCode.RESOURCE_EXHAUSTED

        first = await generate(a, "key-c", chat("One?", salt="salt-d"))
        again = await generate(b, "key-c", chat("Two?", salt="salt-d"))
        other = await generate(a, "key-d", chat("Three?", salt="salt-c"))
        assert first.worker_id == again.worker_id == other.worker_id == worker.worker_id
        assert again.usage.cached_tokens >= 64, "the tenant's own prefix is cached"
        assert other.usage.cached_tokens == 0, "another tenant never reuses it, whatever its salt says"

        url = f"http://127.0.0.1:{a.http_port}/v1/chat/completions"
        body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
        async with aiohttp.ClientSession() as http:
            async with http.post(url, json=body) as response:
                assert response.status == 401
            async with http.post(url, json=body, headers={"Authorization": "Bearer key-a"}) as response:
                assert response.status == 429, await response.text()
                assert "requests per minute" in (await response.json())["error"]["message"]
            async with http.get(f"http://127.0.0.1:{a.http_port}/health") as response:
                assert response.status == 200  # probes need no key
    finally:
        await a.stop(1)
        await b.stop(1)
