"""Redis outages of 2, 8 and 30 s under steady load through a real gateway process in front of two
real SmolLM2 workers: not one request fails, and the workers are back in the registry within
seconds of Redis returning (empty: it keeps no data). Then the secret check over the whole run:
the Redis password is in no log and in no process's argv."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import pytest

from kvmesh.v1 import inference_pb2 as pb
from kvmesh.v1 import inference_pb2_grpc

from .conftest import PASSWORD, Launcher, Redis, wait_serving

pytestmark = [pytest.mark.integration, pytest.mark.faults, pytest.mark.slow, pytest.mark.timeout(420)]

DEPLOYMENT = "faults-outage"
CLIENTS = 3


@pytest.fixture(scope="module")
def fleet(launcher: Launcher, redis: Redis):
    env = launcher.env(redis)
    # One worker takes the URL with the password inside it (from the environment), the other the
    # password file: both ways must stay out of every log.
    inline = launcher.env(None, KVMESH_REDIS_URL=f"redis://:{PASSWORD}@127.0.0.1:{redis.port}/0")
    workers = [launcher.worker("w0", DEPLOYMENT, env), launcher.worker("w1", DEPLOYMENT, inline)]
    for worker in workers:
        wait_serving(worker)
    gateway = launcher.gateway("gw", DEPLOYMENT, env)
    wait_serving(gateway, 30)
    return workers, gateway


def request(i: int) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        text=f"Request {i}: count from one to five.",
        sampling=pb.SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True),
    )


async def load(address: str, stop: asyncio.Event, log: list[tuple[float, str]]) -> None:
    """``CLIENTS`` clients sending one request after another until ``stop``; every outcome logged."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)

        async def client(c: int) -> None:
            i = 0
            while not stop.is_set():
                i += 1
                try:
                    responses = [r async for r in stub.Generate(request(c * 100000 + i), timeout=30)]
                    assert responses[-1].usage.completion_tokens == 2
                    log.append((time.monotonic(), "OK"))
                except grpc.aio.AioRpcError as e:
                    log.append((time.monotonic(), f"{e.code().name}: {e.details()}"))

        await asyncio.gather(*(client(c) for c in range(CLIENTS)))


@pytest.mark.parametrize("outage_s", [2, 8, 30])
async def test_redis_outage_loses_no_request(fleet, redis: Redis, outage_s: int):
    _, gateway = fleet
    assert redis.workers(DEPLOYMENT) == {"w0", "w1"}
    stop, log = asyncio.Event(), []
    running = asyncio.ensure_future(load(gateway.address, stop, log))
    try:
        await asyncio.sleep(1.0)
        redis.stop()
        down_at = time.monotonic()
        await asyncio.sleep(outage_s)
        redis.start()
        up_at = time.monotonic()
        while redis.workers(DEPLOYMENT) != {"w0", "w1"}:
            assert time.monotonic() - up_at < 10, "workers did not re-register within 10 s"
            await asyncio.sleep(0.05)
        rejoin_s = time.monotonic() - up_at
        await asyncio.sleep(2.0)  # traffic after the workers are back
    finally:
        stop.set()
        await running
    failed = [outcome for _, outcome in log if outcome != "OK"]
    during = [t for t, outcome in log if down_at <= t <= up_at and outcome == "OK"]
    print(f"outage={outage_s}s requests={len(log)} during_outage={len(during)} failed={len(failed)} "
          f"re-registered_in={rejoin_s:.2f}s")  # fmt: skip
    assert not failed, failed[:5]
    assert len(during) >= outage_s, "the gateway should keep serving while Redis is down"
    assert rejoin_s < 3.0, f"workers took {rejoin_s:.2f}s to re-register"


def test_redis_password_in_no_log_and_no_argv(fleet, launcher: Launcher, redis: Redis):
    """Runs after the outages, so reconnect and failure lines are in the logs too."""
    workers, gateway = fleet
    logs = {p.name: p.log() for p in launcher.processes}
    assert all(logs.values()), "every process logged something"
    assert "Registered worker_id=w1 in the metadata store at redis://:***@127.0.0.1" in logs["w1"]
    for name, text in logs.items():
        assert PASSWORD not in text, f"{name}'s log holds the Redis password"
    seen = 0
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes()
        except OSError:
            continue  # the process exited meanwhile
        seen += 1
        assert PASSWORD.encode() not in argv, f"{cmdline} holds the Redis password: {argv[:200]!r}"
    assert seen > len(launcher.processes)
    for process in (*workers, gateway):
        assert process.proc.poll() is None, f"{process.name} exited"
