"""The gateway in front of three real SmolLM2 worker processes (CPU), on Redis and in-process stores.

Workers start once per module with a small KV pool and report to a module-wide redis-server.
The test that kills a worker runs last.
"""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from kvmesh.gateway.server import Gateway, GatewayOptions
from kvmesh.v1 import inference_pb2 as pb
from kvmesh.v1 import inference_pb2_grpc, worker_pb2, worker_pb2_grpc

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(300)]

DEPLOYMENT = "gw-test"
WORKER_ARGS = ["--num-blocks", "192", "--max-num-seqs", "16"]
WORDS = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel",
         "india", "juliet", "kilo", "lima", "mike", "november", "oscar", "papa")  # fmt: skip


def system_prompt(tag: str, words: int = 110) -> str:
    body = " ".join(WORDS[(i * 7 + len(tag)) % len(WORDS)] for i in range(words))
    return f"You are the assistant of team {tag}. Follow these rules: {body}."


def chat(
    system: str, user: str, max_tokens: int = 2, salt: str = "", ignore_eos: bool = True
) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        chat=pb.ChatInput(
            messages=[
                pb.ChatMessage(role="system", content=system),
                pb.ChatMessage(role="user", content=user),
            ]
        ),
        sampling=pb.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=ignore_eos),
        cache_salt=salt,
    )


async def generate(
    address: str, request: pb.GenerateRequest, timeout: float = 120
) -> tuple[pb.GenerateResponse, dict]:
    async with grpc.aio.insecure_channel(address) as channel:
        call = inference_pb2_grpc.InferenceStub(channel).Generate(request, timeout=timeout)
        responses = [r async for r in call]
        return responses[-1], dict(await call.initial_metadata())


@pytest.fixture(scope="module")
def workers(worker_launcher, module_redis_server):
    started = [
        worker_launcher.start(f"w{i}", redis_url=module_redis_server.url, deployment=DEPLOYMENT,
                              extra=WORKER_ARGS, wait=False)
        for i in range(3)
    ]  # fmt: skip
    for w in started:
        worker_launcher.wait_ready(w)
    return started


async def start_gateway(**overrides) -> Gateway:
    gateway = Gateway(GatewayOptions(port=0, deployment=DEPLOYMENT, shutdown_grace=2, **overrides))
    await gateway.start()
    assert await gateway.wait_for_workers(overrides.pop("expect", 3), timeout_s=30) >= 1
    return gateway


async def test_shared_system_prompt_lands_on_its_holder_with_cache_hits(workers, module_redis_server):
    gateway = await start_gateway(redis_url=module_redis_server.url)
    try:
        assert await gateway.wait_for_workers(3, 30) == 3
        system = system_prompt("hits")
        first, meta = await generate(gateway.address, chat(system, "What is rule one?"))
        holder = first.worker_id
        assert holder and meta["kvmesh-worker"] == holder
        prompt_blocks = first.usage.prompt_tokens // 16
        assert prompt_blocks >= 8
        for question in ("What is rule two?", "Summarize the rules.", "Who are you?", "Say hello."):
            response, meta = await generate(gateway.address, chat(system, question))
            assert response.worker_id == holder, meta
            assert meta["kvmesh-route-outcome"] == "prefix_hit"
            # The worker confirms the hit: at least the system prompt's full blocks were cached.
            assert response.usage.cached_tokens >= (prompt_blocks - 2) * 16, response.usage
    finally:
        await gateway.stop(1)


async def test_two_gateway_replicas_sharing_redis_agree(workers, module_redis_server):
    a = await start_gateway(redis_url=module_redis_server.url)
    b = await start_gateway(redis_url=module_redis_server.url)
    try:
        for i in range(4):
            first, second = (a, b) if i % 2 == 0 else (b, a)
            system = system_prompt(f"replicas-{i}")
            r1, _ = await generate(first.address, chat(system, "First question?"))
            r2, meta = await generate(second.address, chat(system, "Second question?"))
            assert r1.worker_id == r2.worker_id, (i, meta)
            assert r2.usage.cached_tokens > 0
    finally:
        await a.stop(1)
        await b.stop(1)


async def test_in_process_store_routes_and_propagates_errors(workers):
    gateway = await start_gateway(workers=[w.address for w in workers])
    try:
        assert await gateway.wait_for_workers(3, 30) == 3
        system = system_prompt("embedded")
        holders = {
            (await generate(gateway.address, chat(system, q)))[0].worker_id for q in ("a?", "b?", "c?")
        }
        assert len(holders) == 1
        async with grpc.aio.insecure_channel(gateway.address) as channel:
            stub = inference_pb2_grpc.InferenceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                [r async for r in stub.Generate(pb.GenerateRequest(), timeout=10)]
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "no input" in err.value.details()
            bad_chat = pb.GenerateRequest(chat=pb.ChatInput(messages=[pb.ChatMessage(content="x")]))
            with pytest.raises(grpc.aio.AioRpcError) as err:
                [r async for r in stub.Generate(bad_chat, timeout=10)]
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            models = await stub.ListModels(pb.ListModelsRequest(), timeout=10)
            assert models.models[0].id == "SmolLM2-135M-Instruct"
            ids = (await stub.Tokenize(pb.TokenizeRequest(text="hello world"), timeout=10)).token_ids
            assert len(ids) >= 2
    finally:
        await gateway.stop(1)


async def test_local_tokenizer_agrees_with_the_workers(workers):
    """--tokenizer default loads SmolLM2's tokenizer in the gateway; its ids must be the worker's, or
    the gateway's hashes would never match the workers' caches."""
    from kvmesh.gateway.tokenizer import LocalTokenizer

    local = LocalTokenizer("default")
    request = chat(system_prompt("tok"), "Héllo, wörld! 12345 ✓")
    async with grpc.aio.insecure_channel(workers[1].address) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        remote = await stub.Tokenize(pb.TokenizeRequest(chat=request.chat), timeout=30)
        remote_text = await stub.Tokenize(pb.TokenizeRequest(text="plain text, no template"), timeout=30)
    assert await local.encode(request) == list(remote.token_ids)
    assert await local.encode(pb.GenerateRequest(text="plain text, no template")) == list(
        remote_text.token_ids
    )


async def _running(address: str) -> int:
    async with grpc.aio.insecure_channel(address) as channel:
        load = await worker_pb2_grpc.WorkerStub(channel).GetLoad(worker_pb2.GetLoadRequest(), timeout=5)
        return load.running + load.waiting


async def _wait_idle(workers, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        loads = [await _running(w.address) for w in workers]
        if not any(loads):
            return
        assert time.monotonic() < deadline, f"workers still busy: {loads}"
        await asyncio.sleep(0.2)


async def test_deadline_and_cancel_reach_the_worker(workers, module_redis_server):
    gateway = await start_gateway(redis_url=module_redis_server.url)
    try:
        long = chat(system_prompt("long"), "Write a long story.", max_tokens=2000)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await generate(gateway.address, long, timeout=1.5)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        await _wait_idle(workers)  # the worker aborted the sequence

        async with grpc.aio.insecure_channel(gateway.address) as channel:
            call = inference_pb2_grpc.InferenceStub(channel).Generate(long, timeout=60)
            async for _ in call:
                break  # streaming started on a worker
            call.cancel()
        await _wait_idle(workers)
    finally:
        await gateway.stop(1)


async def test_redis_restart_mid_traffic_degrades_without_failing_requests(workers, module_redis_server):
    gateway = await start_gateway(redis_url=module_redis_server.url)
    try:
        assert await gateway.wait_for_workers(3, 30) == 3
        system = system_prompt("restart")
        served = []
        degraded_seen = False
        for i in range(9):
            if i == 2:
                await asyncio.to_thread(module_redis_server.stop)
            if i == 5:
                await asyncio.to_thread(module_redis_server.start)  # back, and empty
            response, _ = await generate(gateway.address, chat(system, f"Question {i}?"))
            served.append(response.worker_id)
            degraded_seen = degraded_seen or gateway.pool.degraded
        assert all(served)  # no request failed
        assert degraded_seen and gateway.metrics.store_errors.labels("lookup")._value.get() >= 1
        # The reporters re-register and resend their caches; the gateway leaves degraded mode.
        deadline = time.monotonic() + 20
        while gateway.pool.degraded or len(await gateway.store.list_workers()) < 3:
            assert time.monotonic() < deadline, "did not recover from the Redis restart"
            await asyncio.sleep(0.2)
        response, meta = await generate(gateway.address, chat(system, "After the restart?"))
        assert meta["kvmesh-route-outcome"] == "prefix_hit" and response.usage.cached_tokens > 0
    finally:
        await gateway.stop(1)


async def test_saturated_workers_answer_resource_exhausted_and_metrics_show_it(workers, module_redis_server):
    import socket
    import urllib.request

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        metrics_port = sock.getsockname()[1]
    gateway = await start_gateway(
        redis_url=module_redis_server.url, max_inflight=1, metrics_port=metrics_port
    )
    try:
        assert await gateway.wait_for_workers(3, 30) == 3
        slow = [chat(system_prompt(f"busy-{i}", 30), "Tell a story.", max_tokens=40) for i in range(3)]
        running = [asyncio.create_task(generate(gateway.address, r)) for r in slow]
        deadline = time.monotonic() + 60
        while sum(c.inflight for c in gateway.pool.conns.values()) < 3:  # one in flight per worker
            assert time.monotonic() < deadline and not any(t.done() for t in running)
            await asyncio.sleep(0.05)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await generate(gateway.address, chat(system_prompt("one-more", 30), "Hi?"))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "in-flight limit" in err.value.details()
        await asyncio.gather(*running)  # the admitted ones finish normally
        text = await asyncio.to_thread(
            lambda: (
                urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
            )
        )
        assert 'kvmesh:gateway_routing_decisions_total{outcome="exhausted",policy="prefix"} 1.0' in text
        assert "kvmesh:gateway_routing_latency_seconds_bucket" in text
        assert 'kvmesh:gateway_requests_total{code="RESOURCE_EXHAUSTED"} 1.0' in text
    finally:
        await gateway.stop(1)


async def test_killing_a_worker_loses_no_request_that_had_not_started(workers, module_redis_server):
    """Runs last: it kills w0."""
    gateway = await start_gateway(redis_url=module_redis_server.url)
    victim = workers[0]
    outcomes: dict[int, dict] = {}
    killed_at: list[float] = []

    async def one(i: int) -> None:
        out = outcomes.setdefault(i, {})
        async with grpc.aio.insecure_channel(gateway.address) as channel:
            call = inference_pb2_grpc.InferenceStub(channel).Generate(
                chat(system_prompt(f"kill-{i}", words=60), "Count to ten.", max_tokens=6), timeout=120
            )
            try:
                meta = dict(await call.initial_metadata())
                out["started_at"], out["worker"] = time.monotonic(), meta.get("kvmesh-worker")
                out["attempts"] = int(meta.get("kvmesh-attempts", 1))
                out["final"] = [r async for r in call][-1]
            except grpc.aio.AioRpcError as e:
                out["error"] = e.code()

    try:
        assert await gateway.wait_for_workers(3, 30) == 3
        tasks = [asyncio.create_task(one(i)) for i in range(12)]
        await asyncio.sleep(0.4)
        victim.kill()
        killed_at.append(time.monotonic())
        await asyncio.gather(*tasks)
        for i, out in outcomes.items():
            if "error" in out:  # only a request already streaming from the victim may fail
                assert out.get("worker") == victim.worker_id and out["started_at"] < killed_at[0], (i, out)
            else:
                assert out["final"].finish_reason == pb.FINISH_REASON_LENGTH
        assert sum(1 for o in outcomes.values() if "error" not in o) >= 8
        assert any(o.get("attempts", 1) > 1 for o in outcomes.values()), "nothing was retried"
        # The dead worker left the pool: new requests go elsewhere and succeed.
        for i in range(6):
            response, _ = await generate(gateway.address, chat(system_prompt(f"after-{i}", 40), "Hi?"))
            assert response.worker_id != victim.worker_id
    finally:
        await gateway.stop(1)


async def _stays_ready(channel: grpc.aio.Channel, seconds: float) -> bool:
    """Whether the channel keeps its connection (READY) for `seconds` with no call of ours."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if channel.get_state() != grpc.ChannelConnectivity.READY:
            return False
        await asyncio.sleep(0.1)
    return True


async def test_max_connection_age_sends_long_lived_clients_to_reconnect(workers):
    aged = await start_gateway(workers=[w.address for w in workers], max_connection_age_s=1.0)
    plain = await start_gateway(workers=[w.address for w in workers])
    try:
        for gateway, age_limited in ((aged, True), (plain, False)):
            async with grpc.aio.insecure_channel(gateway.address) as channel:
                stub = inference_pb2_grpc.InferenceStub(channel)
                await stub.ListModels(pb.ListModelsRequest(), timeout=10)
                # A GOAWAY (after 1 s plus gRPC's jitter) drops the connection of the aged gateway only.
                assert await _stays_ready(channel, 4.0) is not age_limited
                models = await stub.ListModels(pb.ListModelsRequest(), timeout=10)  # reconnects
                assert models.models
    finally:
        await aged.stop(1)
        await plain.stop(1)
