"""What a user meets when something is wrong: one line saying what, before torch is imported."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def kvmesh(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    """Runs the CLI with -X importtime, so the test can see whether torch was imported."""
    return subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "kvmesh.cli", *args],
        cwd=REPO, capture_output=True, text=True, input=stdin if stdin is not None else "", timeout=120,
    )  # fmt: skip


def messages(result: subprocess.CompletedProcess) -> list[str]:
    """stderr without the import-time report."""
    return [line for line in result.stderr.splitlines() if not line.startswith("import time:")]


def imported(result: subprocess.CompletedProcess, module: str) -> bool:
    return any(line.rsplit("|", 1)[-1].strip() == module for line in result.stderr.splitlines())


@pytest.fixture
def busy_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("./no/such/model", "model path './no/such/model' does not exist"),
        ("tests/no-such-model", "does not exist under ./tests; for the Hugging Face Hub repository write"),
        ("README.md", "is a file but not a .gguf model"),
    ],
)
def test_worker_with_a_bad_model_fails_in_one_line_without_torch(model, expected):
    result = kvmesh("worker", "--model", model)
    assert result.returncode == 2
    [line] = messages(result)
    assert expected in line
    assert not imported(result, "torch")


def test_worker_on_a_taken_port_names_the_flag(busy_port):
    result = kvmesh("worker", "--port", str(busy_port))
    assert result.returncode == 2
    [line] = messages(result)
    assert f"port already in use on 127.0.0.1: --port {busy_port}" in line
    assert not imported(result, "torch")
    result = kvmesh("worker", "--port", "0", "--metrics-port", str(busy_port))
    assert f"--metrics-port {busy_port}" in messages(result)[0]


def test_up_checks_model_and_ports_before_starting_anything(busy_port):
    result = kvmesh("up", "--model", "./missing.gguf")
    assert result.returncode == 2
    assert messages(result) == ["kvmesh up: model path './missing.gguf' does not exist"]
    result = kvmesh("up", "--port", str(busy_port), "--http-port", "0")
    assert result.returncode == 2
    assert f"--port {busy_port}" in messages(result)[0]
    result = kvmesh("up", "--port", "0", "--http-port", "0", "--worker-metrics-port", str(busy_port))
    assert f"worker 0 metrics {busy_port}" in messages(result)[0]
    assert not imported(result, "torch")


@pytest.mark.parametrize("command", [["generate", "Hello"], ["chat"]])
def test_clients_with_nothing_listening_ask_whether_kvmesh_up_runs(command):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    result = kvmesh(*command, "--target", f"127.0.0.1:{closed}")
    assert result.returncode == 1
    assert messages(result) == [
        f"error: nothing answers at 127.0.0.1:{closed}: is `kvmesh up` (or a worker) running there?"
    ]


def test_generate_without_a_prompt_says_what_to_do():
    result = kvmesh("generate", stdin="")
    assert result.returncode == 2
    assert messages(result) == ["error: give a prompt (or pipe one in); for a conversation run `kvmesh chat`"]


def test_gateway_on_a_taken_port_names_the_flag(busy_port):
    result = kvmesh("gateway", "--worker", "127.0.0.1:1", "--metrics-port", str(busy_port))
    assert result.returncode == 2
    assert messages(result) == [
        f"kvmesh gateway: port already in use on 127.0.0.1: --metrics-port {busy_port} "
        "(another kvmesh process?); choose another"
    ]
