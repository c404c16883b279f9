"""Shared fixtures for integration tests: a real redis-server and real kvmesh worker processes.

Everything listens on loopback ports picked free at start; every process is stopped at teardown.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout_s: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listened on 127.0.0.1:{port} within {timeout_s}s")


class RedisServer:
    """A real redis-server on a loopback port, without persistence; restartable on the same port."""

    def __init__(self, binary: str) -> None:
        self.binary = binary
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="kvmesh-redis-")
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                self.binary,
                "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", self.dir, "--protected-mode", "no", "--loglevel", "warning",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        wait_for_port(self.port, 10, self.proc)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()


def _redis_server() -> Iterator[RedisServer]:
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    if not os.path.exists(binary):
        pytest.skip("redis-server is not installed (scripts/bootstrap.sh --test installs it)")
    server = RedisServer(binary)
    server.start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(server.dir, ignore_errors=True)


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A fresh redis-server for one test."""
    yield from _redis_server()


@pytest.fixture(scope="module")
def module_redis_server() -> Iterator[RedisServer]:
    """One redis-server shared by a test module (e.g. with long-lived workers reporting to it)."""
    yield from _redis_server()


@dataclass
class WorkerProcess:
    worker_id: str
    port: int
    metrics_port: int
    proc: subprocess.Popen
    log_path: Path
    args: list[str] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.alive():
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


class WorkerLauncher:
    """Starts real ``kvmesh worker`` processes (SmolLM2 by default) with a small KV pool."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.workers: list[WorkerProcess] = []

    def start(
        self,
        worker_id: str,
        redis_url: str | None = None,
        deployment: str = "test",
        model: str = "default",
        extra: list[str] | None = None,
        wait: bool = True,
    ) -> WorkerProcess:
        port, metrics_port = free_port(), free_port()
        args = [
            sys.executable, "-m", "kvmesh.cli", "worker", "--model", model,
            "--host", "127.0.0.1", "--port", str(port), "--metrics-port", str(metrics_port),
            "--worker-id", worker_id, "--advertise-address", f"127.0.0.1:{port}",
            "--deployment", deployment, "--block-size", "16",
        ]  # fmt: skip
        args += worker_extra_args()
        if redis_url:
            args += ["--redis-url", redis_url]
        args += extra or []
        log_path = self.tmp / f"{worker_id}.log"
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(args, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
        worker = WorkerProcess(worker_id, port, metrics_port, proc, log_path, args)
        self.workers.append(worker)
        if wait:
            self.wait_ready(worker)
        return worker

    def wait_ready(self, worker: WorkerProcess, timeout_s: float = 240) -> None:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        try:
            wait_for_port(worker.port, timeout_s, worker.proc)
            deadline = time.monotonic() + timeout_s
            with grpc.insecure_channel(worker.address) as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                while time.monotonic() < deadline:
                    try:
                        status = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2).status
                        if status == health_pb2.HealthCheckResponse.SERVING:
                            return
                    except grpc.RpcError:
                        pass
                    if not worker.alive():
                        break
                    time.sleep(0.2)
        except (TimeoutError, RuntimeError):
            pass
        raise RuntimeError(f"worker {worker.worker_id} did not become ready:\n{worker.log()[-3000:]}")

    def stop_all(self) -> None:
        for w in self.workers:
            w.stop()


def worker_extra_args() -> list[str]:
    """Engine flags keeping a CPU worker cheap (small KV pool, one thread); override with
    KVMESH_TEST_WORKER_ARGS."""
    return os.environ.get("KVMESH_TEST_WORKER_ARGS", "").split()


def worker_available() -> bool:
    try:
        import kvmesh.worker.cli  # noqa: F401
    except Exception:
        return False
    return True


@pytest.fixture(scope="module")
def worker_launcher(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerLauncher]:
    if not worker_available():
        pytest.skip("kvmesh.worker.cli is not available")
    launcher = WorkerLauncher(tmp_path_factory.mktemp("workers"))
    try:
        yield launcher
    finally:
        launcher.stop_all()
