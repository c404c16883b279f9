"""Mid-stream failover: SIGKILL a real worker while it streams through a real gateway process; every
stream completes (0 failed requests) and each one the killed worker was serving is, token for token
and character for character, the greedy output of an uninterrupted run."""

from __future__ import annotations

import asyncio
import signal
from dataclasses import dataclass, field

import grpc
import pytest

from kvmesh.v1 import inference_pb2 as pb
from kvmesh.v1 import inference_pb2_grpc

from .conftest import Launcher, wait_serving

pytestmark = [pytest.mark.integration, pytest.mark.faults, pytest.mark.slow, pytest.mark.timeout(300)]

STREAMS = 8
MAX_TOKENS = 48
TOPICS = ("rivers", "mountains", "bridges", "clocks", "gardens", "trains", "lighthouses", "bees")


@dataclass
class Stream:
    worker: str = ""
    ids: list[int] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    final: pb.GenerateResponse | None = None
    error: str = ""


def request(i: int) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        chat=pb.ChatInput(messages=[pb.ChatMessage(role="user", content=f"Write about {TOPICS[i]}.")]),
        sampling=pb.SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True),
    )


async def run(address: str, streams: list[Stream], started: asyncio.Event | None = None) -> list[Stream]:
    """Runs ``STREAMS`` greedy streams at once, filling ``streams``; sets ``started`` once every
    stream has a few tokens."""

    async def one(i: int, stub: inference_pb2_grpc.InferenceStub) -> None:
        call = stub.Generate(request(i), timeout=120)
        try:
            streams[i].worker = dict(await call.initial_metadata()).get("kvmesh-worker", "")
            async for response in call:
                streams[i].ids.extend(response.token_ids)
                streams[i].text.append(response.text)
                if response.finish_reason:
                    streams[i].final = response
                if started is not None and all(len(s.ids) >= 4 for s in streams):
                    started.set()
        except grpc.aio.AioRpcError as e:
            streams[i].error = f"{e.code().name}: {e.details()}"

    async with grpc.aio.insecure_channel(address) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        await asyncio.gather(*(one(i, stub) for i in range(STREAMS)))
    return streams


async def test_sigkill_mid_stream_loses_nothing_and_greedy_output_is_unchanged(launcher: Launcher):
    env = launcher.env(None)
    workers = {name: launcher.worker(name, "faults-failover", env) for name in ("fa", "fb")}
    for worker in workers.values():
        wait_serving(worker)
    addresses = [arg for w in workers.values() for arg in ("--worker", w.address)]
    gateway = launcher.gateway("gw-failover", "faults-failover", env, extra=addresses)
    wait_serving(gateway, 30)

    reference = await run(gateway.address, [Stream() for _ in range(STREAMS)])  # uninterrupted
    assert not [s.error for s in reference if s.error]

    started, streams = asyncio.Event(), [Stream() for _ in range(STREAMS)]
    running = asyncio.ensure_future(run(gateway.address, streams, started))
    await asyncio.wait_for(started.wait(), 60)
    # Kill the worker serving the most streams, while every stream is under way.
    victim_name = max(workers, key=lambda n: sum(1 for s in streams if s.worker == n))
    workers[victim_name].stop(signal.SIGKILL)
    await running
    assert all(s.final is None or len(s.ids) > 4 for s in streams)

    failed = [s.error for s in streams if s.error]
    assert not failed, failed
    moved = [i for i, s in enumerate(streams) if s.worker == victim_name]
    assert moved, "some streams were on the killed worker"
    for i, (got, want) in enumerate(zip(streams, reference, strict=True)):
        assert got.final is not None and got.final.usage.completion_tokens == MAX_TOKENS, (i, got.final)
        assert got.final.usage.prompt_tokens == want.final.usage.prompt_tokens
        assert got.ids == want.ids, f"stream {i} (on {got.worker}) diverged from the uninterrupted run"
        assert "".join(got.text) == "".join(want.text), i
    for i in moved:
        assert streams[i].final.worker_id != victim_name, "finished by the surviving worker"
    continued = gateway.log().count("Continuing request_id=")
    print(f"killed {victim_name} under {STREAMS} streams: {len(moved)} continued elsewhere, 0 failed")
    assert continued >= len(moved)
