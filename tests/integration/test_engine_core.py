"""The worker's two processes: the front (gRPC, tokens, text) and its engine core (the step loop).

Real ``kvmesh worker`` processes on SmolLM2; each test kills or inspects the real child process.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import grpc
import pytest

from kvmesh.client import build_request, stream
from kvmesh.v1 import inference_pb2

pytestmark = [pytest.mark.integration, pytest.mark.slow]

from worker_fixtures import WORKER_ARGS, wait_idle  # noqa: E402


def children(pid: int) -> list[int]:
    """Process ids whose parent is ``pid`` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name (field 2) may hold spaces: the parent id is the 2nd field after it.
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry.name))
    return found


def engine_core(pid: int) -> int:
    for child in children(pid):
        try:
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
        except OSError:
            continue
        if b"kvmesh.worker.engine.core" in cmdline:
            return child
    raise AssertionError(f"worker {pid} has no engine core child")


def gone(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return True
        if stat.rsplit(")", 1)[1].split()[0] == "Z":  # exited, not yet reaped
            return True
        time.sleep(0.05)
    return False


async def test_stop_string_ends_the_stream_in_the_front_and_frees_the_core_blocks(worker_launcher):
    worker = worker_launcher.start("core-stop", extra=WORKER_ARGS)
    async with grpc.aio.insecure_channel(worker.address) as ch:
        question = [{"role": "user", "content": "What is the capital of France?"}]
        request = build_request(messages=question, max_tokens=64, temperature=0, stop=[" Paris"])
        responses = [r async for r in stream(ch, request)]
        text = "".join(r.text for r in responses)
        assert text == "The capital of France is"
        assert responses[-1].finish_reason == inference_pb2.FINISH_REASON_STOP
        # The core generated on until the front's abort arrived; nothing stays allocated.
        await wait_idle(ch)


async def test_a_killed_engine_core_fails_requests_and_the_worker_exits_nonzero(worker_launcher):
    worker = worker_launcher.start("core-kill", extra=WORKER_ARGS)
    core = engine_core(worker.proc.pid)
    async with grpc.aio.insecure_channel(worker.address) as ch:
        request = build_request("Count from one to a thousand.", max_tokens=400, ignore_eos=True)
        responses = stream(ch, request)
        await anext(responses)  # streaming
        os.kill(core, signal.SIGKILL)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in responses:
                pass
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert await asyncio.to_thread(worker.proc.wait, 60) == 1
    assert "Engine core stopped" in worker.log()


def test_the_engine_core_exits_with_a_killed_worker(worker_launcher):
    worker = worker_launcher.start("core-orphan", extra=WORKER_ARGS)
    core = engine_core(worker.proc.pid)
    worker.kill()  # SIGKILL: the front gets no chance to stop its child
    assert gone(core, 10), "the engine core outlived its worker"
