"""A first start, as a new user meets it: the GGUF is converted once however many processes ask,
with visible progress; Ctrl-C at any stage stops promptly and leaves nothing behind; each local
worker gets its own metrics port."""

from __future__ import annotations

import os
import selectors
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parents[2]
UP = [sys.executable, "-m", "kvmesh.cli", "up", "--port", "0", "--http-port", "0"]


def start(args: list[str], cache: Path) -> subprocess.Popen:
    env = dict(os.environ, KVMESH_CACHE=str(cache), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def convert(cache: Path) -> subprocess.Popen:
    return start([sys.executable, "-m", "kvmesh.worker.model.convert", "default"], cache)


def read_until(proc: subprocess.Popen, marker: str, timeout_s: float = 300) -> str:
    selector = selectors.DefaultSelector()
    selector.register(proc.stdout, selectors.EVENT_READ)
    text, deadline = "", time.monotonic() + timeout_s
    while marker not in text:
        if time.monotonic() > deadline or (proc.poll() is not None and not selector.select(0)):
            raise AssertionError(f"{marker!r} not printed; output so far:\n{text}")
        if selector.select(timeout=0.5):
            text += os.read(proc.stdout.fileno(), 65536).decode(errors="replace")
    return text


def finish(proc: subprocess.Popen, timeout_s: float = 300) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout_s)
    return proc.returncode, out.decode(errors="replace")


def leftovers(cache: Path) -> list[str]:
    models = cache / "models"
    return sorted(p.name for p in models.glob(".convert-*")) if models.is_dir() else []


def test_concurrent_first_starts_convert_once_and_clean_a_killed_conversions_leftovers(tmp_path, monkeypatch):
    from kvmesh.models import default_gguf_path
    from kvmesh.worker.model.convert import converted_path

    monkeypatch.setenv("KVMESH_CACHE", str(tmp_path))
    target = converted_path(default_gguf_path())
    stale = target.parent / f".convert-{target.name}-killed"  # what a SIGKILLed conversion leaves
    stale.mkdir(parents=True)
    first = convert(tmp_path)
    started = read_until(first, "Converting")
    second = convert(tmp_path)  # starts while the first holds the lock
    (code1, out1), (code2, out2) = finish(first), finish(second)
    out1 = started + out1
    assert code1 == code2 == 0, out1 + out2
    assert (out1 + out2).count("Converting SmolLM2") == 1
    assert "Waiting for another process to finish converting" in out2
    ready = {line for line in (out1 + out2).splitlines() if line.startswith("Model ready: ")}
    assert len(ready) == 1
    directory = Path(ready.pop().removeprefix("Model ready: "))
    assert directory == target and (directory / "generation_config.json").is_file()
    assert leftovers(tmp_path) == []  # the killed conversion's directory too


def test_interrupted_conversion_stops_and_removes_its_work(tmp_path):
    proc = convert(tmp_path)
    read_until(proc, "Converting")
    time.sleep(1)
    proc.send_signal(signal.SIGTERM)
    code, _ = finish(proc, timeout_s=60)
    assert code == 130
    assert leftovers(tmp_path) == []
    assert not [p for p in (tmp_path / "models").iterdir() if not p.name.startswith(".")]


def test_up_interrupted_while_preparing_the_model_leaves_nothing(tmp_path):
    up = start([*UP, "--workers", "2"], tmp_path)
    output = read_until(up, "Converting")
    assert "Preparing model 'default'" in output
    up.send_signal(signal.SIGINT)
    code, rest = finish(up, timeout_s=60)
    assert code == 0, output + rest
    assert leftovers(tmp_path) == []
    assert "Starting 2 worker(s)" not in output + rest  # no worker was started


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_up_gives_each_worker_its_own_metrics_port_and_stops_on_ctrl_c(smollm_dir, tmp_path):
    base = free_port()
    cache = Path(os.environ.get("KVMESH_CACHE", Path.home() / ".cache" / "kvmesh"))  # already converted
    up = start([*UP, "--workers", "2", "--no-sample", f"--worker-arg=--metrics-port={base}",
                "--worker-arg=--num-blocks=64"], cache)  # fmt: skip
    try:
        output = read_until(up, "Serving; Ctrl-C to stop.")
        for i in range(2):
            assert f"worker local-{i} metrics: http://127.0.0.1:{base + i}/metrics" in output
            page = urllib.request.urlopen(f"http://127.0.0.1:{base + i}/metrics", timeout=10).read().decode()
            assert "kvmesh:num_requests_running" in page
        up.send_signal(signal.SIGINT)
        code, rest = finish(up, timeout_s=60)
        assert code == 0 and "Stopped." in rest
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
