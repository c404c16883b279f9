"""The gateway's OpenAI HTTP API in front of two real SmolLM2 workers serving two model names, as
``kvmesh up`` builds it (in-process store fed by the workers' Worker API), driven by the official
``openai`` client and ``curl``: routing by ``model``, both models listed over HTTP and gRPC, the
same tokens as gRPC through the same core, and 404/400/429/503 in OpenAI's error shape."""

from __future__ import annotations

import asyncio
import json

import grpc
import openai
import pytest
from openai_fixtures import MODEL, QUESTION, curl, error_of, grpc_tokens, sse_events
from worker_fixtures import WORKER_ARGS, wait_idle

from kvmesh.gateway.server import Gateway, GatewayOptions
from kvmesh.v1 import inference_pb2 as pb
from kvmesh.v1 import inference_pb2_grpc

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]

MODEL_B = "smollm-b"


@pytest.fixture(scope="module")
def workers(worker_launcher):
    a = worker_launcher.start("oa-a", extra=WORKER_ARGS, wait=False)
    b = worker_launcher.start("oa-b", extra=[*WORKER_ARGS, "--served-model-name", MODEL_B], wait=False)
    for w in (a, b):
        worker_launcher.wait_ready(w)
    return a, b


async def start_gateway(addresses: list[str], expect: int, **overrides) -> Gateway:
    gateway = Gateway(GatewayOptions(port=0, http_port=0, workers=addresses, shutdown_grace=1, **overrides))
    await gateway.start()
    assert await gateway.wait_for_workers(expect, timeout_s=30) == expect
    return gateway


@pytest.fixture
async def gateway(workers):
    gateway = await start_gateway([w.address for w in workers], expect=2)
    yield gateway
    await gateway.stop(1)


def clients(gateway: Gateway) -> tuple[openai.OpenAI, openai.AsyncOpenAI]:
    url = f"http://127.0.0.1:{gateway.http_port}/v1"
    return (
        openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=120),
        openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0, timeout=120),
    )


async def test_both_models_listed_and_routed_by_name(gateway, workers) -> None:
    client, _ = clients(gateway)
    listed = await asyncio.to_thread(client.models.list)
    assert sorted(m.id for m in listed) == sorted([MODEL, MODEL_B])
    async with grpc.aio.insecure_channel(gateway.address) as channel:
        models = await inference_pb2_grpc.InferenceStub(channel).ListModels(
            pb.ListModelsRequest(), timeout=10
        )
    assert sorted(m.id for m in models.models) == sorted([MODEL, MODEL_B])
    assert all(m.max_model_len == 2048 for m in models.models)
    for model, worker in ((MODEL, workers[0]), (MODEL_B, workers[1])):
        raw = await asyncio.to_thread(
            client.chat.completions.with_raw_response.create,
            model=model, messages=[{"role": "user", "content": QUESTION}], max_tokens=12, temperature=0,
        )  # fmt: skip
        assert raw.headers["kvmesh-worker"] == worker.worker_id
        answer = raw.parse()
        assert answer.model == model and "Paris" in answer.choices[0].message.content
    status, body = await asyncio.to_thread(
        curl, f"http://127.0.0.1:{gateway.http_port}/v1/completions", "-d", '{"prompt": "hi"}'
    )
    assert status == 400 and MODEL_B in error_of(body)["message"]  # two models: name one
    with pytest.raises(openai.NotFoundError) as err:
        await asyncio.to_thread(client.completions.create, model="gpt-17", prompt="hi")
    assert err.value.body["code"] == "model_not_found"


async def test_one_gateway_routes_two_deployments_through_redis(worker_launcher, module_redis_server) -> None:
    """``--deployment dep-a,dep-b``: one pool per deployment in Redis, each model on its own workers."""
    a = worker_launcher.start(
        "dep-a-w", redis_url=module_redis_server.url, deployment="dep-a", extra=WORKER_ARGS, wait=False
    )
    b = worker_launcher.start(
        "dep-b-w", redis_url=module_redis_server.url, deployment="dep-b",
        extra=[*WORKER_ARGS, "--served-model-name", MODEL_B], wait=False,
    )  # fmt: skip
    for w in (a, b):
        worker_launcher.wait_ready(w)
    gateway = Gateway(
        GatewayOptions(
            port=0, http_port=0, redis_url=module_redis_server.url, deployment="dep-a,dep-b", shutdown_grace=1
        )
    )
    await gateway.start()
    try:
        assert await gateway.wait_for_workers(2, timeout_s=30) == 2
        client, _ = clients(gateway)
        assert sorted(m.id for m in await asyncio.to_thread(client.models.list)) == sorted([MODEL, MODEL_B])
        for model, worker in ((MODEL, a), (MODEL_B, b)):
            raw = await asyncio.to_thread(
                client.completions.with_raw_response.create, model=model, prompt="Hello", max_tokens=2
            )
            assert raw.headers["kvmesh-worker"] == worker.worker_id
    finally:
        await gateway.stop(1)
        a.stop()
        b.stop()


async def test_http_and_grpc_give_the_same_tokens_through_the_core(gateway) -> None:
    client, _ = clients(gateway)
    prompt = "Write a haiku about the sea."
    ids, text = await grpc_tokens(
        gateway.address,
        pb.GenerateRequest(
            model=MODEL_B,
            text=prompt,
            sampling=pb.SamplingParams(max_tokens=16, temperature=0, ignore_eos=True),
        ),
    )
    answer = await asyncio.to_thread(
        client.completions.create, model=MODEL_B, prompt=prompt, max_tokens=16, temperature=0, logprobs=1,
        extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True},
    )  # fmt: skip
    choice = answer.choices[0]
    assert [int(t.removeprefix("token_id:")) for t in choice.logprobs.tokens] == ids
    assert choice.text == text and len(ids) == 16


async def test_async_stream_with_usage_and_cached_tokens(gateway) -> None:
    _, aclient = clients(gateway)
    system = "You are terse. " + " ".join(f"Fact {i}: the sea is wide." for i in range(30))
    messages = [{"role": "system", "content": system}, {"role": "user", "content": QUESTION}]
    async with aclient:
        await aclient.chat.completions.create(model=MODEL, messages=messages, max_tokens=2)
        stream = await aclient.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=6, temperature=0, stream=True, logprobs=True,
            top_logprobs=2, stream_options={"include_usage": True},
        )  # fmt: skip
        chunks = [c async for c in stream]
    usage = chunks[-1].usage
    assert usage.prompt_tokens_details.cached_tokens >= 16 * 10  # routed to the prefix's holder
    entries = [
        e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content
    ]
    assert len(entries) == usage.completion_tokens and all(len(e.top_logprobs) == 2 for e in entries)
    status, body = await asyncio.to_thread(
        curl, f"http://127.0.0.1:{gateway.http_port}/v1/chat/completions", "-d",
        json.dumps({"model": MODEL, "messages": messages, "max_tokens": 3, "stream": True}),
    )  # fmt: skip
    assert status == 200 and sse_events(body)[-1] == "[DONE]"


async def test_client_hang_up_aborts_on_the_worker(gateway, workers) -> None:
    body = json.dumps({"model": MODEL_B, "prompt": "Count:", "max_tokens": 2000, "stream": True,
                       "ignore_eos": True})  # fmt: skip
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.http_port)
    writer.write(
        f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n{body}".encode()
    )
    await writer.drain()
    await reader.readuntil(b"data: ")  # streaming from the worker has begun
    writer.close()  # hang up mid-stream
    async with grpc.aio.insecure_channel(workers[1].address) as channel:
        await wait_idle(channel, timeout_s=10)  # the gateway cancelled its call; the worker aborted


async def test_overload_is_429_and_no_worker_is_503(workers) -> None:
    gateway = await start_gateway([workers[1].address], expect=1, max_inflight=1)
    try:
        _, aclient = clients(gateway)
        async with aclient:
            long = await aclient.completions.create(
                model=MODEL_B, prompt="Count:", max_tokens=400, stream=True, extra_body={"ignore_eos": True}
            )
            await anext(aiter(long))  # one request in flight on the only worker
            with pytest.raises(openai.RateLimitError) as err:
                await aclient.completions.create(model=MODEL_B, prompt="Hi", max_tokens=2)
            assert "in-flight limit" in err.value.body["message"]
            await long.close()
    finally:
        await gateway.stop(1)
    nobody = Gateway(GatewayOptions(port=0, http_port=0, workers=["127.0.0.1:9"], shutdown_grace=1))
    await nobody.start()
    try:
        status, body = await asyncio.to_thread(
            curl, f"http://127.0.0.1:{nobody.http_port}/v1/completions", "-d", '{"prompt": "hi"}'
        )
        assert status == 503 and error_of(body)["type"] == "service_unavailable_error"
        assert (await asyncio.to_thread(curl, f"http://127.0.0.1:{nobody.http_port}/ready"))[0] == 503
    finally:
        await nobody.stop(1)
