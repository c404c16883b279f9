"""``kvmesh up``: a gateway and N local workers on the embedded defaults, in one command.

First the model is prepared once (a GGUF converted, a Hub model downloaded) in a child process
that prints its progress, so the workers never race to convert the same file. Workers then run
as child processes (``kvmesh worker``), each with its own metrics port when asked; the gateway
runs here on the in-process store, fed from the workers' own Worker API. Prints the address,
shows one generation, then serves until Ctrl-C/SIGTERM and stops the gateway first, then its
workers. Ctrl-C at any stage stops everything within a few seconds and leaves nothing behind.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time

from kvmesh.gateway.router import POLICIES

SAMPLE_PROMPT = "What is the capital of France? Answer in one sentence."


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workers", type=int, default=2, help="local worker processes (default 2)")
    parser.add_argument("--model", default="default", help="model for every worker (default: SmolLM2-135M)")
    parser.add_argument("--host", default="127.0.0.1", help="gateway address (default 127.0.0.1)")
    parser.add_argument(
        "--port", type=int, default=50051, help="gateway port (default 50051, where `kvmesh generate` looks)"
    )
    parser.add_argument("--metrics-port", type=int, default=0, help="gateway /metrics port (0: off)")
    parser.add_argument(
        "--http-port",
        type=int,
        default=8000,
        help="gateway's OpenAI HTTP API port (default 8000; 0 picks one)",
    )
    parser.add_argument(
        "--worker-metrics-port", type=int, default=0,
        help="first worker's /metrics port; worker i gets this + i (0: off)",
    )  # fmt: skip
    parser.add_argument("--policy", default="prefix", choices=POLICIES, help="routing policy")
    parser.add_argument("--worker-arg", action="append", default=[], help="extra flag for every worker")
    parser.add_argument("--no-sample", action="store_true", help="skip the sample generation")
    parser.add_argument("--ready-timeout", type=float, default=600.0, help="seconds to wait for workers")
    parser.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def die_with_parent() -> None:
    """Children get SIGTERM if this process dies without stopping them (Linux prctl)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def split_metrics_port(worker_args: list[str]) -> tuple[list[str], int]:
    """Takes ``--metrics-port P`` out of the extra worker flags: each worker gets a port of its own."""
    out, port, i = [], 0, 0
    while i < len(worker_args):
        arg = worker_args[i]
        if arg == "--metrics-port" and i + 1 < len(worker_args):
            port, i = int(worker_args[i + 1]), i + 2
            continue
        if arg.startswith("--metrics-port="):
            port = int(arg.split("=", 1)[1])
        else:
            out.append(arg)
        i += 1
    return out, port


def worker_metrics_ports(args: argparse.Namespace) -> list[int]:
    base = args.worker_metrics_port
    return [base + i if base else 0 for i in range(args.workers)]


async def prepare_model(model: str, stop: asyncio.Event) -> int:
    """Converts or downloads the model once, in a child that prints its progress; 130 if stopped."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "kvmesh.worker.model.convert", model, start_new_session=True
    )
    stopped = asyncio.ensure_future(stop.wait())
    await asyncio.wait({stopped, asyncio.ensure_future(proc.wait())}, return_when=asyncio.FIRST_COMPLETED)
    if proc.returncode is None:  # Ctrl-C: the child removes its half-written directory and exits
        proc.send_signal(signal.SIGTERM)
        await proc.wait()
        return 130
    stopped.cancel()
    return proc.returncode


def start_workers(args: argparse.Namespace) -> list[tuple[subprocess.Popen, str]]:
    threads = max(1, (os.cpu_count() or 1) // max(1, args.workers))
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    children = []
    for i, metrics_port in enumerate(worker_metrics_ports(args)):
        port = free_port("127.0.0.1")
        address = f"127.0.0.1:{port}"
        cmd = [
            sys.executable, "-m", "kvmesh.cli", "worker", "--model", args.model, "--host", "127.0.0.1",
            "--port", str(port), "--worker-id", f"local-{i}", "--advertise-address", address,
            "--deployment", "local", "--log-level", args.log_level, "--metrics-port", str(metrics_port),
            *args.worker_arg,
        ]  # fmt: skip
        # Own session: a terminal's Ctrl-C reaches only `up`, which stops things in order.
        proc = subprocess.Popen(cmd, env=env, start_new_session=True, preexec_fn=die_with_parent)
        children.append((proc, address))
    return children


def stop_workers(children: list[tuple[subprocess.Popen, str]], grace_s: float) -> None:
    for proc, _ in children:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for proc, _ in children:
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def sample_generation(address: str) -> None:
    import grpc

    from kvmesh.v1 import inference_pb2, inference_pb2_grpc

    request = inference_pb2.GenerateRequest(
        chat=inference_pb2.ChatInput(
            messages=[inference_pb2.ChatMessage(role="user", content=SAMPLE_PROMPT)]
        ),
        sampling=inference_pb2.SamplingParams(max_tokens=32, temperature=0.0),
    )
    print(f"> {SAMPLE_PROMPT}\n< ", end="", flush=True)
    async with grpc.aio.insecure_channel(address) as channel:
        worker = ""
        async for response in inference_pb2_grpc.InferenceStub(channel).Generate(request, timeout=300):
            print(response.text, end="", flush=True)
            worker = response.worker_id or worker
    print(f"\n(served by {worker})", flush=True)


async def _up(args: argparse.Namespace) -> int:
    from kvmesh.gateway.server import Gateway, GatewayOptions

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"Preparing model {args.model!r}...", flush=True)
    if (code := await prepare_model(args.model, stop)) != 0:
        return 0 if stop.is_set() else code
    children = start_workers(args)
    options = GatewayOptions(
        host=args.host,
        port=args.port,
        metrics_port=args.metrics_port,
        http_port=args.http_port,
        deployment="local",
        workers=[address for _, address in children],
        policy=args.policy,
        shutdown_grace=5.0,
    )
    gateway = Gateway(options)
    ready = False
    try:
        address = await gateway.start()
        print(f"Starting {args.workers} worker(s) for model {args.model!r}...", flush=True)
        deadline = time.monotonic() + args.ready_timeout
        while not stop.is_set():
            if await gateway.wait_for_workers(args.workers, timeout_s=0.5) >= args.workers:
                ready = True
                break
            dead = [p for p, _ in children if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                print("kvmesh up: a worker failed to start (see its log above)", file=sys.stderr)
                return 1
        if stop.is_set():
            return 0
        print(f"kvmesh gateway listening on {address} ({args.workers} workers, policy {args.policy})")
        for i, port in enumerate(worker_metrics_ports(args)):
            if port:
                print(f"  worker local-{i} metrics: http://127.0.0.1:{port}/metrics")
        print(f"OpenAI API at http://{args.host}:{gateway.http_port}/v1", flush=True)
        print(f"Try: kvmesh chat --target {address}", flush=True)
        if not args.no_sample:
            await sample_generation(address)
        print("Serving; Ctrl-C to stop.", flush=True)
        await stop.wait()
        return 0
    finally:
        print("Stopping the gateway and workers...", flush=True)
        await gateway.stop(grace=5.0)
        # Workers still loading hold no requests: a short grace, then they are killed.
        await asyncio.to_thread(stop_workers, children, 30.0 if ready else 3.0)
        print("Stopped.", flush=True)


def run(args: argparse.Namespace) -> int:
    from kvmesh.logs import setup_logging

    setup_logging(args.log_level)
    if args.workers < 1:
        print("kvmesh up: --workers must be >= 1", file=sys.stderr)
        return 2
    args.worker_arg, port = split_metrics_port(args.worker_arg)
    args.worker_metrics_port = args.worker_metrics_port or port
    ports = {"--port": args.port, "--metrics-port": args.metrics_port, "--http-port": args.http_port}
    ports |= {f"worker {i} metrics": p for i, p in enumerate(worker_metrics_ports(args))}
    from kvmesh.ports import taken_ports_error
    from kvmesh.worker.model.loader import ModelNotFound, locate_model

    try:
        locate_model(args.model)
    except ModelNotFound as e:
        print(f"kvmesh up: {e}", file=sys.stderr)
        return 2
    if error := taken_ports_error(args.host, ports):
        print(f"kvmesh up: {error}", file=sys.stderr)
        return 2
    return asyncio.run(_up(args))
