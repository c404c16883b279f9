"""The worker over gRPC: real ``kvmesh worker`` processes serving SmolLM2-135M on the CPU.

One worker serves most tests (module scope); a second one, with a one-slot queue, shows
RESOURCE_EXHAUSTED and then the SIGTERM drain, which stops it (so that test comes last).
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from worker_fixtures import WORKER_ARGS, get_load, scrape, tokenize, wait_for_port, wait_idle

from kvmesh.client import build_request, generate, stream
from kvmesh.prefix import block_hashes
from kvmesh.v1 import inference_pb2, inference_pb2_grpc, worker_pb2, worker_pb2_grpc

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DEPLOYMENT = "grpc-test"
PROMPT = "The capital of France is"
LONG_TEXT = " ".join(
    f"Section {i}: the quick brown fox jumps over the lazy dog while the river keeps flowing."
    for i in range(40)
)


@pytest.fixture(scope="module")
def worker(worker_launcher):
    return worker_launcher.start("grpc-main", extra=WORKER_ARGS)


@pytest.fixture(scope="module")
def small_worker_loading(worker_launcher, request):
    """One running slot, one waiting slot; reports to Redis when a redis-server is installed."""
    try:
        redis_url = request.getfixturevalue("module_redis_server").url
    except pytest.skip.Exception:
        redis_url = None
    extra = [*WORKER_ARGS, "--max-waiting", "1", "--max-num-seqs", "1"]
    worker = worker_launcher.start(
        "grpc-small", redis_url=redis_url, deployment=DEPLOYMENT, extra=extra, wait=False
    )
    worker.redis_url = redis_url
    worker.checked_loading = False
    return worker


@pytest.fixture
def small_worker(small_worker_loading, worker_launcher):
    worker_launcher.wait_ready(small_worker_loading)
    return small_worker_loading


async def registered_workers(redis_url: str) -> dict[str, str]:
    from kvmesh.store.redis_store import RedisStore

    store = RedisStore(redis_url, DEPLOYMENT)
    try:
        return {w.worker_id: w.address for w in await store.list_workers()}
    finally:
        await store.close()


@pytest.fixture
async def channel(worker) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(worker.address) as ch:
        yield ch


async def expect_error(
    channel: grpc.aio.Channel, request: inference_pb2.GenerateRequest
) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await generate(channel, request, timeout=60)
    return info.value


async def test_streams_deltas_then_final_usage(channel, worker) -> None:
    prompt_ids = await tokenize(channel, PROMPT)
    deltas: list[inference_pb2.GenerateResponse] = []
    request = build_request(PROMPT, max_tokens=12, temperature=0, ignore_eos=True, request_id="stream-1")
    result = await generate(channel, request, timeout=60, on_delta=deltas.append)

    assert len(deltas) > 1, "the answer should stream in several messages"
    assert all(d.request_id == "stream-1" for d in deltas)
    assert [d.finish_reason for d in deltas[:-1]] == [0] * (len(deltas) - 1), "only the last message finishes"
    assert result.finish_reason == "length"
    assert "".join(d.text for d in deltas) == result.text and result.text.strip()
    assert len(result.token_ids) == result.completion_tokens == 12
    assert result.prompt_tokens == len(prompt_ids)
    assert result.worker_id == "grpc-main"


async def test_request_id_generated_when_empty(channel) -> None:
    result = await generate(channel, build_request(PROMPT, max_tokens=2, temperature=0), timeout=60)
    assert len(result.request_id) >= 16


async def test_greedy_matches_offline_engine(channel, offline_llm) -> None:
    from kvmesh.worker.engine.sampling_params import SamplingParams

    chat = [{"role": "user", "content": "What is the capital of France?"}]
    over_grpc = [
        await generate(channel, build_request(PROMPT, max_tokens=16, temperature=0), timeout=120),
        await generate(channel, build_request(messages=chat, max_tokens=16, temperature=0), timeout=120),
    ]
    prompts = [PROMPT, offline_llm.encode_chat(chat)]
    params = SamplingParams(max_tokens=16, temperature=0.0)
    offline = await asyncio.to_thread(offline_llm.generate, prompts, params)
    for remote, local in zip(over_grpc, offline, strict=True):
        assert remote.token_ids == local.token_ids
        assert remote.text == local.text
        assert remote.prompt_tokens == len(local.prompt_token_ids)
    assert "Paris" in over_grpc[1].text


async def test_cancel_mid_stream_frees_blocks(channel, worker) -> None:
    await wait_idle(channel)
    responses = stream(channel, build_request(LONG_TEXT, max_tokens=400, temperature=0, ignore_eos=True))
    received = 0
    async for _ in responses:
        received += 1
        if received == 3:
            break
    busy = await get_load(channel)
    assert busy.running == 1 and busy.kv_usage > 0
    await responses.aclose()  # cancels the call

    idle = await wait_idle(channel)
    assert idle.kv_usage == 0.0
    assert scrape(worker.metrics_port)["kvmesh:request_cancelled_total"] >= 1


async def test_deadline_expiry_aborts(channel) -> None:
    await wait_idle(channel)
    start = time.monotonic()
    request = build_request(LONG_TEXT, max_tokens=1000, temperature=0, ignore_eos=True)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await generate(channel, request, timeout=1.5)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - start < 10
    await wait_idle(channel)


BAD_INPUTS = {
    "empty text": dict(prompt=""),
    "empty token ids": dict(token_ids=[]),
    "no input": dict(),
    "empty chat": dict(messages=[]),
    "text longer than the context": dict(prompt=LONG_TEXT * 4),
    "token ids longer than the context": dict(token_ids=[504] * 2100),
    "token id outside the vocabulary": dict(token_ids=[1, 2, 2**31]),
    "stop token id outside the vocabulary": dict(prompt=PROMPT, stop_token_ids=[2**31]),
    "max_tokens 0": dict(prompt=PROMPT, max_tokens=0),
    "max_tokens absurd": dict(prompt=PROMPT, max_tokens=2**32 - 1),
    "temperature < 0": dict(prompt=PROMPT, temperature=-0.5),
    "temperature nan": dict(prompt=PROMPT, temperature=float("nan")),
    "top_p 0": dict(prompt=PROMPT, top_p=0.0),
    "top_p > 1": dict(prompt=PROMPT, top_p=1.5),
}


@pytest.mark.parametrize("kwargs", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
async def test_bad_input_is_invalid_argument(channel, kwargs) -> None:
    kwargs = dict(kwargs)
    error = await expect_error(channel, build_request(kwargs.pop("prompt", None), **kwargs))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
    assert error.details()
    # ... and the worker keeps serving.
    result = await generate(channel, build_request(PROMPT, max_tokens=2, temperature=0), timeout=60)
    assert result.completion_tokens >= 1


async def test_unknown_model_is_not_found(channel) -> None:
    error = await expect_error(channel, build_request(PROMPT, model="no-such-model"))
    assert error.code() == grpc.StatusCode.NOT_FOUND, error
    assert "no-such-model" in error.details()


async def test_bad_input_messages_are_clear(channel) -> None:
    cases = {
        "empty": build_request(""),
        "max_tokens": build_request(PROMPT, max_tokens=0),
        "temperature": build_request(PROMPT, temperature=-1),
        "top_p": build_request(PROMPT, top_p=0),
        "unknown model": build_request(PROMPT, model="gpt-17"),
    }
    for needle, request in cases.items():
        error = await expect_error(channel, request)
        assert needle in error.details(), error.details()


async def test_duplicate_running_request_id_is_refused(channel) -> None:
    first = stream(channel, build_request(PROMPT, max_tokens=200, ignore_eos=True, request_id="dup-1"))
    await anext(first)
    error = await expect_error(channel, build_request(PROMPT, max_tokens=2, request_id="dup-1"))
    assert error.code() == grpc.StatusCode.ALREADY_EXISTS
    await first.aclose()
    await wait_idle(channel)


def test_unset_proto_fields_keep_sampling_defaults() -> None:
    from kvmesh.worker.engine.sampling_params import SamplingParams
    from kvmesh.worker.generation import sampling_params

    defaults = SamplingParams()
    unset = sampling_params(inference_pb2.SamplingParams(), prompt_len=10, max_model_len=2048)
    assert (unset.temperature, unset.top_p, unset.top_k, unset.seed) == (
        defaults.temperature, defaults.top_p, defaults.top_k, defaults.seed,
    )  # fmt: skip
    assert unset.max_tokens == 256
    # The default max_tokens shrinks to the context left instead of failing the request.
    assert sampling_params(inference_pb2.SamplingParams(), 2000, 2048).max_tokens == 48
    # Explicit zeros are kept (and validated by the engine), not mistaken for "unset".
    zeros = sampling_params(
        inference_pb2.SamplingParams(max_tokens=0, temperature=0, top_p=0, seed=0),
        prompt_len=10,
        max_model_len=2048,
    )
    assert (zeros.max_tokens, zeros.temperature, zeros.top_p, zeros.seed) == (0, 0.0, 0.0, 0)


async def test_concurrent_clients_all_complete(channel) -> None:
    prompts = ["Hello, my name is", "The sky is", "Once upon a time", "Python is a"] * 2
    requests = [build_request(p, max_tokens=8, temperature=0) for p in prompts]
    results = await asyncio.gather(*(generate(channel, r, timeout=180) for r in requests))
    assert all(r.finish_reason in ("stop", "length") and r.completion_tokens >= 1 for r in results)
    # Same prompt, greedy, in the same batch: same answer.
    assert [r.token_ids for r in results[:4]] == [r.token_ids for r in results[4:]]
    await wait_idle(channel)


async def test_shared_prefix_is_served_from_cache(channel) -> None:
    prefix = (await tokenize(channel, LONG_TEXT))[:200]
    salt = uuid.uuid4().hex  # a fresh tenant: nothing cached from earlier tests
    first = await generate(
        channel, build_request(token_ids=[*prefix, 504, 505], max_tokens=1, cache_salt=salt), timeout=120
    )
    second = await generate(
        channel, build_request(token_ids=[*prefix, 600, 601, 602], max_tokens=1, cache_salt=salt), timeout=120
    )
    other_tenant = await generate(
        channel, build_request(token_ids=[*prefix, 600], max_tokens=1, cache_salt=salt + "-b"), timeout=120
    )
    assert first.cached_tokens == 0
    assert second.cached_tokens >= 192
    assert second.prompt_tokens == 203
    assert other_tenant.cached_tokens == 0


async def test_list_models_tokenize_and_reflection(channel, worker) -> None:
    stub = inference_pb2_grpc.InferenceStub(channel)
    models = (await stub.ListModels(inference_pb2.ListModelsRequest(), timeout=10)).models
    assert len(models) == 1
    model = models[0]
    assert model.id and model.max_model_len == 2048 and model.block_size == 16

    text_ids = await tokenize(channel, PROMPT)
    assert text_ids
    chat = inference_pb2.ChatInput(messages=[inference_pb2.ChatMessage(role="user", content=PROMPT)])
    chat_ids = (await stub.Tokenize(inference_pb2.TokenizeRequest(chat=chat), timeout=10)).token_ids
    assert len(chat_ids) > len(text_ids)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Tokenize(inference_pb2.TokenizeRequest(model="nope", text=PROMPT), timeout=10)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND

    named = await generate(channel, build_request(PROMPT, model=model.id, max_tokens=2), timeout=60)
    assert named.completion_tokens >= 1

    with grpc.insecure_channel(worker.address) as sync_channel:
        services = set(ProtoReflectionDescriptorDatabase(sync_channel).get_services())
    assert {"kvmesh.v1.Inference", "kvmesh.v1.Worker", "grpc.health.v1.Health"} <= services


async def test_load_and_block_events_use_the_shared_prefix_identity(channel) -> None:
    model = (
        await inference_pb2_grpc.InferenceStub(channel).ListModels(inference_pb2.ListModelsRequest())
    ).models[0]
    load = await get_load(channel)
    assert load.worker_id == "grpc-main" and load.num_blocks == 256 and load.block_size == 16
    assert load.model == model.id

    watch = worker_pb2_grpc.WorkerStub(channel).WatchBlocks(worker_pb2.WatchBlocksRequest())
    snapshot = await asyncio.wait_for(watch.read(), 30)
    assert snapshot.snapshot and snapshot.worker_id == "grpc-main"

    salt = uuid.uuid4().hex
    prompt = (await tokenize(channel, LONG_TEXT))[:64]
    await generate(channel, build_request(token_ids=prompt, max_tokens=1, cache_salt=salt), timeout=60)
    expected = set(block_hashes(prompt, 16, model=model.id, cache_salt=salt))
    stored: set[int] = set()
    deadline = time.monotonic() + 30
    while not expected <= stored and time.monotonic() < deadline:
        event = await asyncio.wait_for(watch.read(), max(0.1, deadline - time.monotonic()))
        stored.update(event.stored)
    watch.cancel()
    assert expected <= stored


async def test_metrics_endpoint(channel, worker) -> None:
    salt = uuid.uuid4().hex
    for _ in range(2):  # the second run hits the prefix cache
        await generate(channel, build_request(LONG_TEXT, max_tokens=3, cache_salt=salt), timeout=120)
    samples = scrape(worker.metrics_port)
    for name in (
        "kvmesh:num_requests_running",
        "kvmesh:num_requests_waiting",
        "kvmesh:kv_cache_usage_perc",
        "kvmesh:num_preemptions_total",
    ):
        assert name in samples, name
    for name in (
        "kvmesh:prompt_tokens_total",
        "kvmesh:generation_tokens_total",
        "kvmesh:prefix_cache_queries_total",
        "kvmesh:prefix_cache_hits_total",
        "kvmesh:time_to_first_token_seconds_count",
        "kvmesh:time_per_output_token_seconds_count",
        "kvmesh:e2e_request_latency_seconds_count",
        'kvmesh:request_success_total{finished_reason="length"}',
        'kvmesh:request_rejected_total{code="INVALID_ARGUMENT"}',
    ):
        assert samples.get(name, 0) > 0, name


async def test_not_serving_while_the_model_loads(small_worker_loading) -> None:
    """The port opens before the model loads: health says NOT_SERVING and generations UNAVAILABLE."""
    await wait_for_port(small_worker_loading.port)
    async with grpc.aio.insecure_channel(small_worker_loading.address) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        status = (await health.Check(health_pb2.HealthCheckRequest(), timeout=5)).status
        if status == health_pb2.HealthCheckResponse.SERVING:
            pytest.skip("the model loaded before the first health check")
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING
        error = await expect_error(ch, build_request(PROMPT, max_tokens=2))
        if error.code() == grpc.StatusCode.UNAVAILABLE:
            assert "loading" in error.details()


def test_generate_command_streams_and_reports(worker) -> None:
    base = [sys.executable, "-m", "kvmesh.cli", "generate", "--target", worker.address]
    ok = subprocess.run(
        [*base, "--raw", "--max-tokens", "6", "--temperature", "0", PROMPT], capture_output=True, text=True
    )
    assert ok.returncode == 0, ok.stderr
    assert "Paris" in ok.stdout
    assert "finish=length" in ok.stderr and "completion_tokens=6" in ok.stderr

    bad = subprocess.run([*base, "--top-p", "2", PROMPT], capture_output=True, text=True)
    assert bad.returncode == 1
    assert bad.stderr.startswith("error: INVALID_ARGUMENT: top_p")


async def test_queue_full_is_resource_exhausted(small_worker) -> None:
    async with grpc.aio.insecure_channel(small_worker.address) as ch:
        running = stream(ch, build_request(LONG_TEXT, max_tokens=500, ignore_eos=True, temperature=0))
        await anext(running)  # admitted and decoding: the single running slot is taken
        waiting = asyncio.ensure_future(generate(ch, build_request(PROMPT, max_tokens=2), timeout=120))
        deadline = time.monotonic() + 20
        while (await get_load(ch)).waiting < 1:
            assert time.monotonic() < deadline, "the second request never queued"
            await asyncio.sleep(0.05)

        error = await expect_error(ch, build_request(PROMPT, max_tokens=2))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error

        await running.aclose()
        assert (await waiting).completion_tokens >= 1, "the queued request runs once the slot frees"
        await wait_idle(ch)


async def test_sigterm_drains_then_exits_cleanly(small_worker) -> None:
    """Last test of the module: it stops the small worker."""
    async with grpc.aio.insecure_channel(small_worker.address) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        for service in ("", "kvmesh.v1.Inference"):
            status = (await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)).status
            assert status == health_pb2.HealthCheckResponse.SERVING

        if small_worker.redis_url:  # the reporter registered the worker under its advertised address
            assert (await registered_workers(small_worker.redis_url)).get(
                "grpc-small"
            ) == small_worker.address

        responses = stream(ch, build_request(PROMPT, max_tokens=40, ignore_eos=True, temperature=0))
        first = await anext(responses)
        small_worker.proc.send_signal(signal.SIGTERM)

        deadline = time.monotonic() + 10
        while (await health.Check(health_pb2.HealthCheckRequest(), timeout=5)).status != (
            health_pb2.HealthCheckResponse.NOT_SERVING
        ):
            assert time.monotonic() < deadline, "health never turned NOT_SERVING"
            await asyncio.sleep(0.05)
        error = await expect_error(ch, build_request(PROMPT, max_tokens=2))
        assert error.code() == grpc.StatusCode.UNAVAILABLE

        rest = [r async for r in responses]  # the in-flight request completes
        assert rest[-1].finish_reason == inference_pb2.FINISH_REASON_LENGTH
        assert len(first.token_ids) + sum(len(r.token_ids) for r in rest) == 40

    assert small_worker.proc.wait(60) == 0
    assert "Worker stopped" in small_worker.log()
    if small_worker.redis_url:  # and deregistered it on the way out
        assert "grpc-small" not in await registered_workers(small_worker.redis_url)


# The offline engine (``LLM``) in this process, for the greedy comparison.


@pytest.fixture(scope="module")
def offline_llm():
    from kvmesh.worker.engine.llm import LLM

    return LLM("default", num_blocks=256, max_model_len=2048)
