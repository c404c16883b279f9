"""A worker that cannot register in Redis is not Ready, says why in one line, and keeps retrying:
a wrong password against a real password-protected redis-server and a refused loopback port, each
a real worker process. Fixing the password makes the first one Ready. (DNS failures are named too,
"DNS lookup failed", but resolving a name would leave loopback.)"""

from __future__ import annotations

import time
import urllib.error
import urllib.request

import pytest
import redis as redis_py
from grpc_health.v1 import health_pb2

from .conftest import Launcher, Redis, free_port, health, wait_serving

pytestmark = [pytest.mark.integration, pytest.mark.faults, pytest.mark.slow, pytest.mark.timeout(360)]

DEPLOYMENT = "faults-register"
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVING = health_pb2.HealthCheckResponse.SERVING


def wait_for_line(process, text: str, timeout_s: float = 300) -> str:
    deadline = time.monotonic() + timeout_s
    while text not in process.log():
        assert process.proc.poll() is None, f"{process.name} exited:\n{process.log()[-3000:]}"
        assert time.monotonic() < deadline, f"{process.name} never logged {text!r}:\n{process.log()[-3000:]}"
        time.sleep(0.2)
    return next(line for line in process.log().splitlines() if text in line)


def http_ready(port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code


def test_unregistered_worker_is_not_ready_and_says_why(launcher: Launcher, redis: Redis, tmp_path):
    wrong = tmp_path / "wrong-password"
    wrong.write_text("not-the-password\n")
    http_port = free_port()
    auth = launcher.worker(
        "w-auth", DEPLOYMENT, launcher.env(redis, KVMESH_REDIS_PASSWORD_FILE=str(wrong)),
        extra=["--http-port", str(http_port)],
    )  # fmt: skip
    refused = launcher.worker(
        "w-refused", DEPLOYMENT, launcher.env(None, KVMESH_REDIS_URL=f"redis://127.0.0.1:{free_port()}/0")
    )

    expected = {auth: "authentication failed", refused: "connection refused"}
    for worker, cause in expected.items():
        line = wait_for_line(worker, "Cannot register worker_id=")
        assert cause in line, line  # the reason is in the line itself
        assert "not ready until registered" in line
    time.sleep(3.0)  # several retries later: still not ready, still running, still one line
    for worker in expected:
        assert health(worker.address) == NOT_SERVING, worker.name  # not ready...
        assert health(worker.address, service="kvmesh.v1.Worker") == SERVING, worker.name  # ...but alive
        assert worker.log().count("Cannot register worker_id=") == 1, worker.log()[-2000:]
        assert "Worker ready" not in worker.log()
        assert "Traceback" not in worker.log()
    assert http_ready(http_port) == 503
    assert redis.workers(DEPLOYMENT) == set()

    with redis.client() as r:  # the operator fixes the Secret's password: the worker recovers alone
        r.config_set("requirepass", "not-the-password")
    try:
        start = time.monotonic()
        wait_serving(auth, 10)
        print(f"registered and SERVING {time.monotonic() - start:.2f}s after the password was fixed")
        assert time.monotonic() - start < 3.0
        assert http_ready(http_port) == 200
        assert "Registered worker_id=w-auth" in auth.log()
    finally:
        with redis_py.Redis(port=redis.port, password="not-the-password") as r:
            r.config_set("requirepass", redis.password)
    assert health(refused.address) == NOT_SERVING
    refused.stop()
    assert refused.proc.returncode == 0, refused.log()[-2000:]
