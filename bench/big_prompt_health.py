"""Health-check latency of a worker while it tokenizes a 3.5 MB prompt.

Starts ``kvmesh worker`` on ``--model``, sends one Tokenize call with a 3.5 MB text and, until it
returns, a health check every 50 ms; prints the tokenizing time and the health checks' p50, p99
and maximum latency. Only the tokenizer matters here, so a small random model that carries the
real model's tokenizer files measures the same thing as the real model.

    python bench/big_prompt_health.py --model default
    python bench/big_prompt_health.py --model /tmp/tiny-with-smollm2-tokenizer --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve import free_port, wait_ready

from kvmesh.v1 import inference_pb2, inference_pb2_grpc

BIG = ("The quick brown fox jumps over the lazy dog. " * 80000)[:3_500_000]


async def one_round(address: str) -> tuple[float, list[float], int]:
    options = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
    async with grpc.aio.insecure_channel(address, options=options) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        stub = inference_pb2_grpc.InferenceStub(channel)
        started = time.monotonic()
        task = asyncio.ensure_future(stub.Tokenize(inference_pb2.TokenizeRequest(text=BIG), timeout=300))
        latencies = []
        while not task.done():
            t0 = time.perf_counter()
            await health.Check(health_pb2.HealthCheckRequest(), timeout=10)
            latencies.append(time.perf_counter() - t0)
            await asyncio.sleep(0.05)
        ids = len((await task).token_ids)
        return time.monotonic() - started, latencies, ids


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--worker-arg", action="append", default=[])
    args = ap.parse_args()
    port = free_port()
    cmd = [sys.executable, "-m", "kvmesh.cli", "worker", "--model", args.model, "--port", str(port)]
    cmd += ["--max-request-bytes", str(8 << 20), *args.worker_arg]
    worker = subprocess.Popen(cmd)
    try:
        address = f"127.0.0.1:{port}"
        asyncio.run(wait_ready(address, worker))
        for i in range(args.rounds):
            seconds, lat, ids = asyncio.run(one_round(address))
            lat.sort()
            p50, p99 = lat[len(lat) // 2], lat[min(len(lat) - 1, round(0.99 * (len(lat) - 1)))]
            print(
                f"round {i + 1}: tokenized 3.5 MB into {ids} tokens in {seconds:.2f}s; "
                f"{len(lat)} health checks: p50 {p50 * 1e3:.1f} ms, p99 {p99 * 1e3:.1f} ms, "
                f"max {lat[-1] * 1e3:.1f} ms",
                flush=True,
            )
    finally:
        worker.terminate()
        worker.wait(60)


if __name__ == "__main__":
    main()
