"""Resident memory of one CPU worker serving the embedded model, as ``ps`` shows it.

Starts ``kvmesh worker`` (from this checkout, or from another given with ``--tree`` to compare
against an older commit), waits until it serves, sends one greedy request, then reads /proc status
of the worker and of its children (the engine core runs in a child process): resident set
(anonymous and file-backed parts) and peak, summed over the processes. Prints one table, a row per
tree, and a row per process of a worker that has more than one.

    python bench/cpu_memory.py
    git archive OLD | tar -x -C /tmp/old && python bench/cpu_memory.py --tree /tmp/old --tree .
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc

REPO = Path(__file__).resolve().parents[1]
FIELDS = ("VmRSS", "RssAnon", "RssFile", "VmHWM")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def status_mib(pid: int) -> dict[str, float]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in FIELDS:
            out[key] = int(value.split()[0]) / 1024
    return out


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def measure(tree: Path, threads: int) -> list[dict[str, float]]:
    """One entry per process of the worker (itself first, then its children)."""
    from kvmesh.client import build_request
    from kvmesh.v1 import inference_pb2_grpc

    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(tree.resolve()), OMP_NUM_THREADS=str(threads))
    cmd = [sys.executable, "-m", "kvmesh.cli", "worker", "--port", str(port), "--log-level", "warning"]
    worker = subprocess.Popen(cmd, cwd=tree, env=env)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = inference_pb2_grpc.InferenceStub(channel)
            deadline = time.monotonic() + 600
            while True:
                request = build_request("Hello", max_tokens=16, temperature=0)
                try:
                    list(stub.Generate(request, timeout=120))
                    break
                except grpc.RpcError:  # not listening yet, or still loading
                    if worker.poll() is not None or time.monotonic() > deadline:
                        raise
                    time.sleep(0.5)
        return [status_mib(pid) for pid in [worker.pid, *children(worker.pid)]]
    finally:
        worker.terminate()
        worker.wait(60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--tree", action="append", type=Path, help="a kvmesh checkout (default: this one)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    trees = args.tree or [REPO]
    print(f"one CPU worker, default model, after one request; MiB ({args.threads} threads)")
    print(f"{'tree':<28}{'RSS':>8}{'anon':>8}{'file':>8}{'peak':>8}")
    for tree in trees:
        processes = measure(tree, args.threads)
        total = {k: sum(p[k] for p in processes) for k in FIELDS}
        print(f"{str(tree)[-28:]:<28}" + "".join(f"{total[k]:>8.0f}" for k in FIELDS))
        if len(processes) > 1:
            for name, m in zip(["  front", "  engine core", "  other"], processes):
                print(f"{name:<28}" + "".join(f"{m[k]:>8.0f}" for k in FIELDS))


if __name__ == "__main__":
    main()
