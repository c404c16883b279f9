"""Fixtures for fault scenarios: a password-protected redis-server that can be stopped and started
on the same port, and real ``kvmesh worker`` / ``kvmesh gateway`` processes that take their Redis URL
and password from the environment (never from argv). Every process is stopped at teardown."""

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
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PASSWORD = "kvmesh-fault-s3cret-4f9a"  # grepped for in every log and argv
WORKER_ARGS = ["--num-blocks", "192", "--max-num-seqs", "16", "--block-size", "16", "--max-model-len", "2048"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


class Redis:
    """A real redis-server requiring ``password``; ``stop``/``start`` keep the port (no persistence,
    so a restart comes back empty, like a Redis pod without a volume)."""

    def __init__(self, password: str = PASSWORD) -> None:
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        if not os.path.exists(binary):
            pytest.skip("redis-server is not installed")
        self.binary, self.password, self.port = binary, password, free_port()
        self.dir = tempfile.mkdtemp(prefix="kvmesh-faults-redis-")
        self.password_file = Path(self.dir) / "password"
        self.password_file.write_text(password + "\n")
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        config = Path(self.dir) / "redis.conf"  # the password in a file, not in redis-server's argv
        config.write_text(
            f'port {self.port}\nbind 127.0.0.1\nsave ""\nappendonly no\ndir {self.dir}\n'
            f"requirepass {self.password}\nloglevel warning\n"
        )
        self.proc = subprocess.Popen([self.binary, str(config)], stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not port_open(self.port):
            assert time.monotonic() < deadline and self.proc.poll() is None, "redis-server did not start"
            time.sleep(0.02)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)  # an outage, not a clean shutdown
            self.proc.wait(10)
        self.proc = None

    def client(self):
        import redis

        return redis.Redis(port=self.port, password=self.password, socket_timeout=2, decode_responses=True)

    def workers(self, deployment: str) -> set[str]:
        from kvmesh.store.redis_keys import RedisKeys

        keys = RedisKeys(deployment)
        with self.client() as r:
            return {w for w in r.smembers(keys.workers) if r.exists(keys.worker(w))}


@dataclass(eq=False)
class Process:
    name: str
    port: int
    proc: subprocess.Popen
    log_path: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


class Launcher:
    """Starts ``kvmesh worker`` and ``kvmesh gateway`` processes with the Redis URL and password file
    in their environment."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.processes: list[Process] = []

    def env(self, redis: Redis | None, **extra: str) -> dict[str, str]:
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
        for key in ("KVMESH_REDIS_URL", "KVMESH_REDIS_PASSWORD", "KVMESH_REDIS_PASSWORD_FILE"):
            env.pop(key, None)
        if redis is not None:
            env.update(KVMESH_REDIS_URL=redis.url, KVMESH_REDIS_PASSWORD_FILE=str(redis.password_file))
        env.update(extra)
        return env

    def spawn(self, name: str, args: list[str], env: dict[str, str]) -> Process:
        port = free_port()
        log_path = self.tmp / f"{name}.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "kvmesh.cli", *args, "--port", str(port)],
                cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env,
            )  # fmt: skip
        process = Process(name, port, proc, log_path)
        self.processes.append(process)
        return process

    def worker(self, name: str, deployment: str, env: dict[str, str], extra: list[str] = ()) -> Process:
        args = ["worker", "--model", "default", "--host", "127.0.0.1", "--worker-id", name,
                "--deployment", deployment, *WORKER_ARGS, *extra]  # fmt: skip
        return self.spawn(name, args, env)

    def gateway(self, name: str, deployment: str, env: dict[str, str], extra: list[str] = ()) -> Process:
        args = ["gateway", "--host", "127.0.0.1", "--deployment", deployment, "--shutdown-grace", "2", *extra]
        return self.spawn(name, args, env)

    def stop_all(self) -> None:
        for process in self.processes:
            process.stop()


def health(address: str, timeout: float = 2.0, service: str = "") -> int:
    """The server's overall health status (``HealthCheckResponse.ServingStatus``); -1 when unreachable."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        try:
            stub = health_pb2_grpc.HealthStub(channel)
            return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout).status
        except grpc.RpcError:
            return -1


def wait_serving(process: Process, timeout_s: float = 300) -> None:
    from grpc_health.v1 import health_pb2

    deadline = time.monotonic() + timeout_s
    while health(process.address) != health_pb2.HealthCheckResponse.SERVING:
        if process.proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{process.name} did not become SERVING:\n{process.log()[-3000:]}")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def launcher(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Launcher]:
    launcher = Launcher(tmp_path_factory.mktemp("faults"))
    try:
        yield launcher
    finally:
        launcher.stop_all()


@pytest.fixture(scope="module")
def redis() -> Iterator[Redis]:
    server = Redis()
    server.start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(server.dir, ignore_errors=True)
