"""What the OpenAI HTTP front costs over gRPC at the gateway, per request.

Starts one real ``kvmesh worker`` (SmolLM2-135M, CPU unless ``--worker-arg``) and one ``kvmesh
gateway`` subprocess with both fronts, then sends the same one-token request (a short token-id
prompt, greedy, ``max_tokens`` 1) over and over, one at a time, rotating through four paths so the
worker's own noise falls on all of them alike:

- ``grpc direct``: gRPC ``Generate`` to the worker (the model's own time, the baseline);
- ``grpc gateway``: gRPC ``Generate`` through the gateway;
- ``http gateway``: ``POST /v1/completions`` through the gateway (aiohttp client, keep-alive);
- ``http gateway stream``: the same with ``stream: true`` (SSE until ``data: [DONE]``).

Prints one table: p50/p90/p99 latency per path and each path's p50 added over ``grpc gateway``.
Client costs are included (the grpc and aiohttp client libraries differ), so the HTTP column is an
upper bound on what the gateway's HTTP front adds. ``--tiny`` serves a random-weight two-layer Llama
with SmolLM2's tokenizer instead, so the model's own time (and its noise on a busy CPU) stays small
next to the fronts' costs.

``--concurrency N`` sends N requests at once per round (requests/s then measures what each path
sustains with the gateway's event loop busy).

    .venv/bin/python bench/http_overhead.py --requests 400 --tiny
    .venv/bin/python bench/http_overhead.py --requests 800 --tiny --concurrency 16
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import grpc

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kvmesh.gateway.up import die_with_parent  # noqa: E402
from kvmesh.v1 import inference_pb2, inference_pb2_grpc  # noqa: E402

PROMPT_IDS = [504, 3458, 282, 4649, 314]  # five token ids; the text does not matter


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args: list[str], log: Path) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    with open(log, "wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "kvmesh.cli", *args], cwd=REPO, env=env, stdout=out,
            stderr=subprocess.STDOUT, preexec_fn=die_with_parent,
        )  # fmt: skip


async def wait_ready(stub: inference_pb2_grpc.InferenceStub, timeout_s: float = 300.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            await one_grpc(stub)
            return
        except grpc.aio.AioRpcError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)


async def one_grpc(stub: inference_pb2_grpc.InferenceStub) -> None:
    request = inference_pb2.GenerateRequest(
        token_ids=inference_pb2.TokenIds(ids=PROMPT_IDS),
        sampling=inference_pb2.SamplingParams(max_tokens=1, temperature=0.0),
    )
    async for _ in stub.Generate(request, timeout=30):
        pass


async def one_http(session: aiohttp.ClientSession, url: str, stream: bool) -> None:
    body = {"prompt": PROMPT_IDS, "max_tokens": 1, "temperature": 0, "stream": stream}
    async with session.post(url, json=body) as response:
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {await response.text()}")
        if not stream:
            json.loads(await response.read())
            return
        async for line in response.content:
            if line.startswith(b"data: [DONE]"):
                return


def tiny_model(path: Path) -> Path:
    """A random-weight two-layer Llama with SmolLM2's tokenizer, saved as a Hugging Face directory."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from kvmesh.worker.model.loader import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("default").directory)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def measure(
    worker: str, gateway: str, http_port: int, requests: int, warmup: int, concurrency: int
) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Per path: latencies (ms) and requests per second. Each round sends ``concurrency`` requests
    at once on one path, then moves to the next path."""
    url = f"http://127.0.0.1:{http_port}/v1/completions"
    async with (
        grpc.aio.insecure_channel(worker) as worker_channel,
        grpc.aio.insecure_channel(gateway) as gateway_channel,
        aiohttp.ClientSession() as session,
    ):
        direct, routed = (
            inference_pb2_grpc.InferenceStub(worker_channel),
            inference_pb2_grpc.InferenceStub(gateway_channel),
        )
        await wait_ready(direct)
        await wait_ready(routed)
        paths = {
            "grpc direct": lambda: one_grpc(direct),
            "grpc gateway": lambda: one_grpc(routed),
            "http gateway": lambda: one_http(session, url, stream=False),
            "http gateway stream": lambda: one_http(session, url, stream=True),
        }
        samples: dict[str, list[float]] = {name: [] for name in paths}
        busy: dict[str, float] = dict.fromkeys(paths, 0.0)

        async def timed(call) -> float:
            t0 = time.perf_counter()
            await call()
            return (time.perf_counter() - t0) * 1e3

        for i in range(warmup + requests // concurrency):
            for name, call in paths.items():
                t0 = time.perf_counter()
                latencies = await asyncio.gather(*(timed(call) for _ in range(concurrency)))
                if i >= warmup:
                    samples[name] += latencies
                    busy[name] += time.perf_counter() - t0
        return samples, {name: len(samples[name]) / busy[name] for name in paths}


def table(samples: dict[str, list[float]], rates: dict[str, float]) -> str:
    base = statistics.median(samples["grpc gateway"])
    rows = [
        "| path | requests | p50 ms | p90 ms | p99 ms | p50 added over grpc gateway, ms | requests/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, values in samples.items():
        p50 = statistics.median(values)
        added = "" if name in ("grpc gateway", "grpc direct") else f"{p50 - base:+.2f}"
        rows.append(
            f"| {name} | {len(values)} | {p50:.2f} | {percentile(values, 0.9):.2f} | "
            f"{percentile(values, 0.99):.2f} | {added} | {rates[name]:.0f} |"
        )
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=400, help="measured requests per path")
    parser.add_argument("--warmup", type=int, default=20, help="unmeasured requests per path first")
    parser.add_argument("--worker-arg", action="append", default=[], help="extra flag for the worker")
    parser.add_argument("--tiny", action="store_true", help="serve a random-weight two-layer Llama")
    parser.add_argument("--concurrency", type=int, default=1, help="requests in flight at once per path")
    args = parser.parse_args()
    logs = Path(os.environ.get("TMPDIR", "/tmp"))
    if args.tiny:
        directory = tiny_model(Path(tempfile.mkdtemp(prefix="kvmesh-tiny-")))
        args.worker_arg += ["--model", str(directory), "--served-model-name", "tiny"]
    worker_port, gateway_port, http_port = free_port(), free_port(), free_port()
    worker = start(
        ["worker", "--port", str(worker_port), "--worker-id", "bench-w", "--num-blocks", "256",
         "--log-level", "warning", *args.worker_arg],
        logs / "kvmesh-http-bench-worker.log",
    )  # fmt: skip
    gateway = start(
        ["gateway", "--port", str(gateway_port), "--http-port", str(http_port), "--worker",
         f"127.0.0.1:{worker_port}", "--log-level", "warning"],
        logs / "kvmesh-http-bench-gateway.log",
    )  # fmt: skip
    try:
        samples, rates = asyncio.run(
            measure(
                f"127.0.0.1:{worker_port}", f"127.0.0.1:{gateway_port}", http_port, args.requests,
                args.warmup, max(1, args.concurrency),
            )
        )  # fmt: skip
    finally:
        for proc in (gateway, worker):
            proc.terminate()
            proc.wait(30)
    model = (
        "tiny random Llama (2 layers, hidden 64)" if args.tiny else "as --worker-arg says (default SmolLM2)"
    )
    print(f"requests={args.requests} warmup={args.warmup} prompt_tokens={len(PROMPT_IDS)} max_tokens=1 "
          f"concurrency={args.concurrency} cpus={os.cpu_count()} model={model}")  # fmt: skip
    print(table(samples, rates))
    return 0


if __name__ == "__main__":
    sys.exit(main())
