"""Routing benchmark: prefix vs least-load vs round-robin routing on real local workers.

Workload (its own generator, seeded): ``--tenants`` tenants, each with a long system prompt of its
own; conversations pick a tenant with Zipf(``--zipf``) popularity and run ``--turns`` turns, each
turn resending the whole conversation so far (system + earlier user/assistant turns + a new user
message). Conversations interleave, ``--concurrency`` requests in flight at once. Every policy gets
the same requests; each policy runs under its own ``cache_salt``, so it starts from cold caches.

Per policy it prints: prefix-cache hit rate (cached / prompt tokens, as the workers report them),
mean and p99 TTFT at the client, load imbalance (max/mean requests per worker), and the gateway's
routing overhead p50/p99 (hashing + store lookup + choice, from the ``kvmesh-route-us`` header;
tokenization excluded). The oracle hit rate is the best any routing could do with unbounded
caches: each request's longest block prefix already sent earlier by any request.

    .venv/bin/python bench/routing.py --workers 3 --tenants 12 --conversations 24 --turns 3
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import socket
import statistics
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import grpc

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kvmesh.gateway.up import die_with_parent  # noqa: E402
from kvmesh.prefix import block_hashes  # noqa: E402
from kvmesh.v1 import inference_pb2, inference_pb2_grpc  # noqa: E402

POLICIES = ("prefix", "least-load", "round-robin")
VOCABULARY = (
    "account policy refund invoice shipping warranty customer order delivery support ticket priority "
    "billing subscription contract region latency cluster replica storage network gateway service model "
    "token cache memory schedule request response error retry timeout quota limit plan tier premium basic "
    "enterprise partner vendor product catalog inventory price discount coupon payment method card bank"
)
WORDS = VOCABULARY.split()


@dataclass(slots=True)
class Turn:
    conversation: int
    tenant: int
    messages: list[tuple[str, str]]


@dataclass(slots=True)
class Result:
    ttft_s: float = 0.0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    worker: str = ""
    route_us: int = 0
    error: str = ""


@dataclass(slots=True)
class Summary:
    policy: str
    results: list[Result] = field(default_factory=list)
    wall_s: float = 0.0


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def make_workload(args: argparse.Namespace) -> list[Turn]:
    rng = random.Random(args.seed)
    systems = [
        f"You are the assistant of tenant {t:03d}. Rules: " + sentence(rng, args.system_words)
        for t in range(args.tenants)
    ]
    weights = [1.0 / (rank + 1) ** args.zipf for rank in range(args.tenants)]
    conversations = []
    for c in range(args.conversations):
        tenant = rng.choices(range(args.tenants), weights)[0]
        msgs: list[tuple[str, str]] = [("system", systems[tenant])]
        turns = []
        for _ in range(args.turns):
            msgs = [*msgs, ("user", sentence(rng, args.user_words) + "?")]
            turns.append(Turn(c, tenant, list(msgs)))
            msgs = [*msgs, ("assistant", sentence(rng, args.assistant_words) + ".")]
        conversations.append(turns)
    # Interleave: a pool of active conversations, one random turn at a time, so a conversation's
    # next turn comes a while after its previous one (as users do) and turns never overlap.
    order: list[Turn] = []
    active = [list(t) for t in conversations[: args.active]]
    waiting = [list(t) for t in conversations[args.active :]]
    while active:
        i = rng.randrange(len(active))
        order.append(active[i].pop(0))
        if not active[i]:
            active.pop(i)
            if waiting:
                active.append(waiting.pop(0))
    return order


def to_request(turn: Turn, salt: str, max_tokens: int) -> inference_pb2.GenerateRequest:
    return inference_pb2.GenerateRequest(
        chat=inference_pb2.ChatInput(
            messages=[inference_pb2.ChatMessage(role=r, content=c) for r, c in turn.messages]
        ),
        sampling=inference_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True),
        cache_salt=salt,
    )


async def send(stub: inference_pb2_grpc.InferenceStub, request: inference_pb2.GenerateRequest) -> Result:
    result = Result()
    start = time.perf_counter()
    call = stub.Generate(request, timeout=300)
    try:
        async for response in call:
            if not result.ttft_s and response.token_ids:
                result.ttft_s = time.perf_counter() - start
            if response.HasField("usage") and response.usage.prompt_tokens:
                result.prompt_tokens = response.usage.prompt_tokens
                result.cached_tokens = response.usage.cached_tokens
                result.worker = response.worker_id
        metadata = dict(await call.initial_metadata())
        result.route_us = int(metadata.get("kvmesh-route-us", 0))
    except grpc.aio.AioRpcError as e:
        result.error = e.code().name
    return result


async def run_policy(address: str, policy: str, workload: list[Turn], args: argparse.Namespace) -> Summary:
    salt = f"bench-{policy}-{args.seed}-{time.time_ns()}"
    summary = Summary(policy)
    semaphore = asyncio.Semaphore(args.concurrency)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)

        async def one(turn: Turn) -> Result:
            async with semaphore:
                return await send(stub, to_request(turn, salt, args.max_tokens))

        start = time.perf_counter()
        # The semaphore admits in FIFO order, so requests start in workload order.
        summary.results = list(await asyncio.gather(*(one(turn) for turn in workload)))
        summary.wall_s = time.perf_counter() - start
    return summary


async def oracle_hit_rate(address: str, workload: list[Turn], block_size: int) -> float:
    """Best possible hit rate with unbounded caches: the longest block prefix sent before."""
    seen: set[int] = set()
    cached = total = 0
    async with grpc.aio.insecure_channel(address) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        for turn in workload:
            chat = to_request(turn, "", 1).chat
            ids = list((await stub.Tokenize(inference_pb2.TokenizeRequest(chat=chat), timeout=60)).token_ids)
            hashes = block_hashes(ids, block_size, model="oracle")
            hit = 0
            for h in hashes:
                if h not in seen:
                    break
                hit += 1
            seen.update(hashes)
            # As in the workers: at least the last prompt token is always computed.
            cached += min(hit * block_size, (len(ids) - 1) // block_size * block_size)
            total += len(ids)
    return cached / max(1, total)


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def table(summaries: list[Summary], oracle: float, n_workers: int) -> str:
    head = (
        f"| policy | requests | errors | hit rate (tokens) | vs oracle | mean TTFT ms | p99 TTFT ms "
        f"| imbalance max/mean | route p50 us | route p99 us | wall s |\n|{'---|' * 11}"
    )
    rows = [head]
    for s in summaries:
        ok = [r for r in s.results if not r.error]
        hit = sum(r.cached_tokens for r in ok) / max(1, sum(r.prompt_tokens for r in ok))
        ttfts = [r.ttft_s * 1000 for r in ok if r.ttft_s]
        per_worker = Counter(r.worker for r in ok)
        counts = [per_worker.get(w, 0) for w in sorted(per_worker)] + [0] * (n_workers - len(per_worker))
        imbalance = max(counts) / (sum(counts) / len(counts)) if sum(counts) else float("nan")
        routes = [r.route_us for r in ok]
        rows.append(
            f"| {s.policy} | {len(s.results)} | {len(s.results) - len(ok)} | {hit:.1%} | {hit / oracle:.2f} "
            f"| {statistics.fmean(ttfts):.0f} | {pct(ttfts, 0.99):.0f} | {imbalance:.2f} "
            f"| {pct(routes, 0.5):.0f} | {pct(routes, 0.99):.0f} | {s.wall_s:.1f} |"
        )
    rows.append(f"\noracle hit rate (unbounded caches, any worker): {oracle:.1%}")
    return "\n".join(rows)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[:6]} exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"port {port} did not open")


def start_workers(
    args: argparse.Namespace, redis_url: str, logdir: Path
) -> list[tuple[subprocess.Popen, str]]:
    threads = max(1, (os.cpu_count() or 1) // args.workers)

    def preexec() -> None:
        # In production the gateway has CPUs of its own (workers sit on GPU nodes); on one small
        # machine, nicer workers keep the gateway's routing overhead from measuring CPU starvation.
        die_with_parent()
        os.nice(args.worker_nice)

    env = dict(os.environ, OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    out = []
    for i in range(args.workers):
        port = free_port()
        cmd = [
            sys.executable, "-m", "kvmesh.cli", "worker", "--model", args.model, "--port", str(port),
            "--worker-id", f"bench-{i}", "--advertise-address", f"127.0.0.1:{port}", "--deployment", "bench",
            "--block-size", str(args.block_size), *args.worker_arg,
        ]  # fmt: skip
        if redis_url:
            cmd += ["--redis-url", redis_url]
        log = open(logdir / f"worker-{i}.log", "wb")  # noqa: SIM115 - lives as long as the process
        out.append(
            (
                subprocess.Popen(
                    cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, preexec_fn=preexec
                ),
                f"127.0.0.1:{port}",
            )
        )
    return out


def start_gateway(args: argparse.Namespace, policy: str, workers: list[str], redis_url: str, logdir: Path):
    port = free_port()
    cmd = [sys.executable, "-m", "kvmesh.cli", "gateway", "--port", str(port), "--policy", policy,
           "--deployment", "bench", "--log-level", "warning"]  # fmt: skip
    cmd += ["--redis-url", redis_url] if redis_url else [a for w in workers for a in ("--worker", w)]
    log = open(logdir / f"gateway-{policy}.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, preexec_fn=die_with_parent)
    wait_port(port, proc, 60)
    return proc, f"127.0.0.1:{port}"


async def wait_ready(address: str, n_workers: int, timeout_s: float) -> int:
    """Waits until the gateway serves ListModels with every worker known; returns the block size."""
    deadline = time.monotonic() + timeout_s
    async with grpc.aio.insecure_channel(address) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        while time.monotonic() < deadline:
            try:
                models = await stub.ListModels(inference_pb2.ListModelsRequest(), timeout=5)
                probe = inference_pb2.GenerateRequest(
                    text="warm up", sampling=inference_pb2.SamplingParams(max_tokens=1), cache_salt="warmup"
                )
                workers = set()
                for _ in range(4 * n_workers):
                    async for r in stub.Generate(probe, timeout=120):
                        workers.add(r.worker_id or "")
                    if len(workers - {""}) >= n_workers:
                        break
                return models.models[0].block_size or 16
            except grpc.aio.AioRpcError:
                await asyncio.sleep(0.5)
    raise TimeoutError("the gateway never became ready")


def stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()


async def micro_only(args: argparse.Namespace) -> int:
    rport = free_port()
    proc = subprocess.Popen(
        ["redis-server", "--port", str(rport), "--save", "", "--appendonly", "no", "--bind", "127.0.0.1"],
        stdout=subprocess.DEVNULL,
    )
    try:
        wait_port(rport, proc, 10)
        print(await routing_microbenchmark(f"redis://127.0.0.1:{rport}/0"))
    finally:
        stop([proc])
    return 0


async def main(args: argparse.Namespace) -> int:
    if args.micro_only:
        return await micro_only(args)
    workload = make_workload(args)
    logdir = Path(args.logdir)
    logdir.mkdir(parents=True, exist_ok=True)
    redis_proc = None
    redis_url = ""
    if args.store == "redis":
        rport = free_port()
        redis_proc = subprocess.Popen(
            ["redis-server", "--port", str(rport), "--save", "", "--appendonly", "no", "--bind", "127.0.0.1"],
            stdout=subprocess.DEVNULL,
            preexec_fn=die_with_parent,
        )
        wait_port(rport, redis_proc, 10)
        redis_url = f"redis://127.0.0.1:{rport}/0"
    workers = [] if args.worker_address else start_workers(args, redis_url, logdir)
    addresses = args.worker_address or [a for _, a in workers]
    summaries: list[Summary] = []
    oracle = float("nan")
    micro = ""
    try:
        for policy in args.policies.split(","):
            gateway, address = start_gateway(args, policy, addresses, redis_url, logdir)
            try:
                block_size = await wait_ready(address, len(addresses), args.ready_timeout)
                if oracle != oracle:  # nan: first policy
                    oracle = await oracle_hit_rate(address, workload, block_size)
                print(f"running {policy}: {len(workload)} requests", file=sys.stderr, flush=True)
                summaries.append(await run_policy(address, policy, workload, args))
            finally:
                stop([gateway])
        stop([p for p, _ in workers])
        micro = await routing_microbenchmark(redis_url) if args.micro else ""
    finally:
        stop([p for p, _ in workers] + ([redis_proc] if redis_proc else []))
    print(
        f"workers={len(addresses)} tenants={args.tenants} conversations={args.conversations} "
        f"turns={args.turns} zipf={args.zipf} concurrency={args.concurrency} "
        f"max_tokens={args.max_tokens} store={args.store}"
    )
    print(table(summaries, oracle, len(addresses)))
    if micro:
        print("\nrouting path alone (workers stopped):")
        print(micro)
    return 0


async def routing_microbenchmark(redis_url: str, decisions: int = 2000) -> str:
    """The gateway's routing path alone (hash a 512-token prompt, one store read, choose), on an
    otherwise idle gateway: the overhead without model processes competing for the CPU."""
    from kvmesh.gateway.metrics import GatewayMetrics
    from kvmesh.gateway.pool import WorkerPool
    from kvmesh.gateway.router import Router
    from kvmesh.store import InProcessStore, WorkerInfo
    from kvmesh.store.redis_store import RedisStore

    rng = random.Random(1)
    prompts = [[rng.randrange(49152) for _ in range(512)] for _ in range(24)]
    rows = ["| store | decisions | route p50 us | route p99 us |", "|---|---|---|---|"]
    stores = [("in-process", InProcessStore())]
    if redis_url:
        stores.append(("redis", RedisStore(redis_url, f"micro-{time.time_ns()}")))
    for name, store in stores:
        for i in range(3):
            await store.upsert_worker(WorkerInfo(f"m{i}", f"127.0.0.1:{1 + i}", model="m"), ttl_s=600)
        for j, ids in enumerate(prompts):
            await store.apply_blocks(f"m{j % 3}", block_hashes(ids, 16, model="m"), [])
        pool = WorkerPool(store, GatewayMetrics(), local_load_only=name == "in-process")
        router = Router()
        samples = []
        for k in range(decisions):
            ids = prompts[k % len(prompts)][: 256 + (k % 256)]
            t0 = time.perf_counter()
            hashes = block_hashes(ids, 16, model="m")
            view = await pool.view(hashes)
            router.choose(pool.candidates(view, set()), hashes)
            samples.append((time.perf_counter() - t0) * 1e6)
        rows.append(f"| {name} | {decisions} | {pct(samples, 0.5):.0f} | {pct(samples, 0.99):.0f} |")
        await pool.close()
        await store.close()
    return "\n".join(rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, default=3)
    p.add_argument("--worker-address", action="append", default=[], help="use running workers instead")
    p.add_argument("--worker-arg", action="append", default=[], help="extra flag for each worker")
    p.add_argument("--model", default="default")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--store", choices=("memory", "redis"), default="memory")
    p.add_argument("--policies", default=",".join(POLICIES))
    p.add_argument("--tenants", type=int, default=12)
    p.add_argument("--zipf", type=float, default=1.1)
    p.add_argument("--conversations", type=int, default=24)
    p.add_argument("--active", type=int, default=8, help="conversations interleaved at once")
    p.add_argument("--turns", type=int, default=3)
    p.add_argument("--system-words", type=int, default=220)
    p.add_argument("--user-words", type=int, default=12)
    p.add_argument("--assistant-words", type=int, default=20)
    p.add_argument("--max-tokens", type=int, default=2)
    p.add_argument("--concurrency", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ready-timeout", type=float, default=600)
    p.add_argument("--logdir", default="/tmp/kvmesh-bench")
    p.add_argument("--worker-nice", type=int, default=10, help="niceness of the worker processes")
    p.add_argument("--micro", action="store_true", help="also time the routing path alone")
    p.add_argument("--micro-only", action="store_true", help="only time the routing path alone")
    return p.parse_args(argv)


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse_args())))
