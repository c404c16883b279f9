"""Online serving benchmark: ``kvmesh worker`` driven over gRPC by concurrent streaming clients,
next to the offline engine on the same model in the same run.

The clients are spread over several processes (each with its own event loop and channel), so the
client side is never what limits the figures. Each load level is closed-loop: C clients, each
sending its next request as soon as the previous one ends, over ``--rounds`` requests per client.
Prompts are token ids (greedy, ``ignore_eos``), so every request runs to its output length.

Per level it prints output tok/s online and offline (the same requests through the offline
``LLM`` in a separate process, before the worker starts), TTFT p50/p99 and ITL p50/p99 (the gap
between consecutive streamed messages; a message may carry several tokens when the client
falls behind, which the ``tok/msg`` column shows). With ``--cached-ttft`` it also measures the
time to first token of a 2k-token prompt cold and with 90% of it cached, through gRPC.

    python bench/serve.py --shape llama3-8b --levels 1:128:256,128:512:256,256:512:256 \\
        --sharegpt 256 --cached-ttft --json serve.json          # one H200
    python bench/serve.py --model default --device cpu --levels 1:32:16,4:32:16 --rounds 1
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from kvmesh.v1 import inference_pb2, inference_pb2_grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))


@dataclass
class Record:
    start: float
    first: float | None = None
    end: float = 0.0
    tokens: int = 0
    messages: int = 0
    gaps: list[float] = field(default_factory=list)
    error: str = ""


def request(prompt: list[int], max_tokens: int) -> inference_pb2.GenerateRequest:
    return inference_pb2.GenerateRequest(
        token_ids=inference_pb2.TokenIds(ids=prompt),
        sampling=inference_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True),
    )


async def one(stub, prompt: list[int], max_tokens: int) -> Record:
    rec = Record(start=time.monotonic())
    last = None
    try:
        async for msg in stub.Generate(request(prompt, max_tokens), timeout=600):
            now = time.monotonic()
            if msg.token_ids:
                if rec.first is None:
                    rec.first = now
                elif last is not None:
                    rec.gaps.append(now - last)
                last = now
                rec.tokens += len(msg.token_ids)
                rec.messages += 1
    except grpc.aio.AioRpcError as e:
        rec.error = f"{e.code().name}: {e.details()}"
    rec.end = time.monotonic()
    return rec


async def client_process_main(address: str, work: list[list[tuple[list[int], int]]], start_at: float):
    """One client process: one task per client, each running its list of requests in turn."""
    options = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
    async with grpc.aio.insecure_channel(address, options=options) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        await channel.channel_ready()
        await asyncio.sleep(max(0.0, start_at - time.monotonic()))

        async def client(items):
            return [await one(stub, prompt, n) for prompt, n in items]

        results = await asyncio.gather(*(client(items) for items in work))
    return [r for rs in results for r in rs]


def run_clients(args: tuple) -> list[Record]:
    return asyncio.run(client_process_main(*args))


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, round(p / 100 * (len(values) - 1)))]


def drive(pool, procs: int, address: str, clients: list[list[tuple[list[int], int]]]) -> dict:
    """Runs every client's request list, spread over ``procs`` processes; returns the figures."""
    shares = [clients[i::procs] for i in range(procs)]
    start_at = time.monotonic() + 1.0
    futures = [pool.submit(run_clients, (address, share, start_at)) for share in shares if share]
    records = [r for f in futures for r in f.result()]
    errors = [r.error for r in records if r.error]
    ok = [r for r in records if not r.error]
    wall = max(r.end for r in ok) - min(r.start for r in ok) if ok else float("nan")
    tokens = sum(r.tokens for r in ok)
    ttft = [r.first - r.start for r in ok if r.first is not None]
    gaps = [g for r in ok for g in r.gaps]
    return {
        "requests": len(records),
        "errors": len(errors),
        "first_error": errors[0] if errors else "",
        "out_tok_s": tokens / wall,
        "ttft_p50_ms": percentile(ttft, 50) * 1e3,
        "ttft_p99_ms": percentile(ttft, 99) * 1e3,
        "itl_p50_ms": percentile(gaps, 50) * 1e3,
        "itl_p99_ms": percentile(gaps, 99) * 1e3,
        "tok_per_msg": tokens / max(1, sum(r.messages for r in ok)),
    }


# -- workloads ---------------------------------------------------------------------------
def fixed_level(rng: random.Random, vocab: int, clients: int, in_len: int, out_len: int, rounds: int):
    return [
        [([rng.randrange(10, vocab) for _ in range(in_len)], out_len) for _ in range(rounds)]
        for _ in range(clients)
    ]


def sharegpt_level(rng: random.Random, vocab: int, clients: int, requests: int):
    """Log-normal lengths (median about 180 prompt and 150 output tokens, clipped), the same mix
    as bench/gpu_engine.py's ShareGPT-like run."""
    items = []
    for _ in range(requests):
        n_in = min(max(int(rng.lognormvariate(5.2, 0.9)), 4), 1536)
        n_out = min(max(int(rng.lognormvariate(5.0, 0.8)), 4), 768)
        items.append(([rng.randrange(10, vocab) for _ in range(n_in)], n_out))
    return [items[i::clients] for i in range(clients)]


# -- the model and the two engines ---------------------------------------------------------
def random_model(shape: str, directory: Path, device: str) -> None:
    """Saves a random-weight model of a real shape with a word-level tokenizer (token ids in)."""
    import torch
    from gpu_engine import SHAPES, word_tokenizer
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(SHAPES[shape])
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    config.eos_token_id = None
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(directory)
    word_tokenizer(config.vocab_size).save_pretrained(directory)
    del model


OFFLINE = r"""
import json, sys, time
from kvmesh.worker import LLM, SamplingParams
spec = json.load(open(sys.argv[1]))
llm = LLM(spec["model"], **spec["engine"])
out = {}
for name, (clients, reqs) in spec["levels"].items():
    llm.engine.scheduler.max_num_seqs = clients  # as many in flight as the level has clients
    prompts = [r[0] for r in reqs]
    params = [SamplingParams(max_tokens=r[1], temperature=0.0, ignore_eos=True) for r in reqs]
    # Warm: the level's batch and chunk shapes once, so no kernel compiles inside the timing.
    llm.generate(prompts[:clients], [SamplingParams(max_tokens=16, ignore_eos=True)] * clients)
    t = time.perf_counter()
    res = llm.generate(prompts, params)
    dt = time.perf_counter() - t
    out[name] = sum(len(r.outputs[0].token_ids) for r in res) / dt
json.dump(out, open(sys.argv[2], "w"))
"""


def offline(model: str, engine: dict, levels: dict, tmp: Path) -> dict:
    """Output tok/s of each level's requests through the offline LLM, at most as many at once as
    the level has clients (its own process, so the GPU is free again before the worker starts)."""
    spec, result = tmp / "offline-spec.json", tmp / "offline-out.json"
    flat = {name: (len(cl), [it for items in cl for it in items]) for name, cl in levels.items()}
    spec.write_text(json.dumps({"model": model, "engine": engine, "levels": flat}))
    subprocess.run([sys.executable, "-c", OFFLINE, str(spec), str(result)], check=True)
    return json.loads(result.read_text())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_worker(model: str, port: int, worker_args: list[str], log_path: Path) -> subprocess.Popen:
    log = open(log_path, "w")  # noqa: SIM115 - lives as long as the worker
    cmd = [sys.executable, "-m", "kvmesh.cli", "worker", "--model", model, "--port", str(port)]
    return subprocess.Popen(cmd + worker_args, stdout=log, stderr=subprocess.STDOUT)


async def wait_ready(address: str, proc: subprocess.Popen, timeout: float = 900) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    async with grpc.aio.insecure_channel(address) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"the worker exited with code {proc.returncode}")
            try:
                status = await health.Check(health_pb2.HealthCheckRequest(), timeout=2)
                if status.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.5)
    raise TimeoutError("the worker did not become ready")


async def cached_ttft(address: str, vocab: int, rng: random.Random, length: int = 2048) -> dict:
    """TTFT of a ``length``-token prompt cold, then of another that shares its first 90%."""
    async with grpc.aio.insecure_channel(address) as ch:
        stub = inference_pb2_grpc.InferenceStub(ch)
        cold, warm = [], []
        for _ in range(5):
            base = [rng.randrange(10, vocab) for _ in range(length)]
            r = await one(stub, base, 1)
            cold.append(r.first - r.start)
            shared = base[: int(length * 0.9)] + [rng.randrange(10, vocab) for _ in range(length // 10)]
            r = await one(stub, shared, 1)
            warm.append(r.first - r.start)
    c, w = statistics.median(cold) * 1e3, statistics.median(warm) * 1e3
    return {"cold_ttft_ms": c, "cached_ttft_ms": w, "speedup": c / w}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", help="a random-weight model of this shape (bench/gpu_engine.py SHAPES)")
    ap.add_argument("--model", help="a model path or 'default' instead of --shape")
    ap.add_argument("--model-dir", help="where --shape's model is saved (reused when already there)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--levels", default="1:128:256,128:512:256,256:512:256", help="clients:in:out,...")
    ap.add_argument("--rounds", type=int, default=2, help="requests per client at each fixed level")
    ap.add_argument("--sharegpt", type=int, default=0, help="clients of a ShareGPT-like level (0: none)")
    ap.add_argument("--sharegpt-requests", type=int, default=1024)
    ap.add_argument("--cached-ttft", action="store_true")
    ap.add_argument("--client-procs", type=int, default=max(1, min(8, (os.cpu_count() or 2) // 2)))
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--no-offline", action="store_true")
    ap.add_argument("--worker-arg", action="append", default=[], help="extra `kvmesh worker` flag")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json")
    args = ap.parse_args()

    rng = random.Random(args.seed)
    tmp = Path(tempfile.mkdtemp(prefix="kvmesh-serve-"))
    if args.shape:
        model = args.model_dir or str(tmp / "model")
        if not (Path(model) / "config.json").exists():
            t = time.perf_counter()
            random_model(args.shape, Path(model), args.device)
            print(f"saved a random {args.shape} model in {time.perf_counter() - t:.0f}s", flush=True)
    else:
        model = args.model or "default"
    from transformers import AutoConfig

    from kvmesh.worker.model import loader

    vocab = AutoConfig.from_pretrained(loader.resolve_model(model).directory).vocab_size
    engine = {
        "max_num_seqs": args.max_num_seqs,
        "max_num_batched_tokens": args.max_num_batched_tokens,
        "max_model_len": args.max_model_len,
        "device": args.device,
    }
    levels: dict[str, list] = {}
    for spec in filter(None, args.levels.split(",")):
        c, i, o = (int(x) for x in spec.split(":"))
        levels[f"{c} clients, {i} / {o}"] = fixed_level(rng, vocab, c, i, o, args.rounds)
    if args.sharegpt:
        levels[f"{args.sharegpt} clients, ShareGPT-like"] = sharegpt_level(
            rng, vocab, args.sharegpt, args.sharegpt_requests
        )
    offline_tps = {} if args.no_offline else offline(model, engine, levels, tmp)

    port = free_port()
    address = f"127.0.0.1:{port}"
    worker_args = [
        "--device", args.device,
        "--max-num-seqs", str(args.max_num_seqs),
        "--max-num-batched-tokens", str(args.max_num_batched_tokens),
        "--max-model-len", str(args.max_model_len),
        "--max-waiting", "100000",
        *args.worker_arg,
    ]  # fmt: skip
    log_path = tmp / "worker.log"
    proc = start_worker(model, port, worker_args, log_path)
    results: dict = {"levels": {}, "worker_args": worker_args}
    try:
        asyncio.run(wait_ready(address, proc))
        with ProcessPoolExecutor(args.client_procs, mp_context=mp.get_context("spawn")) as pool:
            warm = fixed_level(rng, vocab, 2, 16, 8, 1)
            drive(pool, args.client_procs, address, warm)
            print(
                "| load | online out tok/s | offline | online/offline | TTFT p50 / p99 ms | "
                "ITL p50 / p99 ms | tok/msg | errors |\n|---|---|---|---|---|---|---|---|",
                flush=True,
            )
            for name, clients in levels.items():
                r = drive(pool, args.client_procs, address, clients)
                off = offline_tps.get(name)
                r["offline_tok_s"] = off
                results["levels"][name] = r
                ratio = f"{r['out_tok_s'] / off:.0%}" if off else "-"
                print(
                    f"| {name} | {r['out_tok_s']:,.0f} | {off or float('nan'):,.0f} | {ratio} | "
                    f"{r['ttft_p50_ms']:.1f} / {r['ttft_p99_ms']:.1f} | "
                    f"{r['itl_p50_ms']:.1f} / {r['itl_p99_ms']:.1f} | {r['tok_per_msg']:.2f} | "
                    f"{r['errors']} {r['first_error']} |",
                    flush=True,
                )
        if args.cached_ttft:
            results["cached_ttft"] = c = asyncio.run(cached_ttft(address, vocab, rng))
            print(
                f"2k prompt, 90% cached, through gRPC: TTFT {c['cached_ttft_ms']:.1f} ms "
                f"(cold {c['cold_ttft_ms']:.1f} ms) = {c['speedup']:.1f}x",
                flush=True,
            )
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        results["worker_exit_code"] = proc.returncode
        results["worker_log_tail"] = log_path.read_text()[-4000:]
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
