"""``kvmesh up``: one command brings up a gateway and a local worker, shows a generation, and stops
its children on SIGTERM."""

from __future__ import annotations

import os
import re
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parents[2]


def children_of(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry))
    return out


def read_until(proc: subprocess.Popen, marker: str, timeout_s: float) -> str:
    selector = selectors.DefaultSelector()
    selector.register(proc.stdout, selectors.EVENT_READ)
    text = ""
    deadline = time.monotonic() + timeout_s
    while marker not in text:
        if time.monotonic() > deadline or proc.poll() is not None:
            raise AssertionError(f"{marker!r} not printed; output so far:\n{text}")
        if selector.select(timeout=0.5):
            # Read the pipe itself: readline() could leave later lines in Python's buffer, where
            # the selector never sees them.
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                continue
            text += chunk.decode(errors="replace")
    return text


def test_up_serves_shows_a_generation_and_stops_cleanly(worker_launcher):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvmesh.cli", "up", "--workers", "1", "--port", "0", "--http-port", "0",
         "--worker-arg=--num-blocks", "--worker-arg=64"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        output = read_until(proc, "Serving; Ctrl-C to stop.", timeout_s=240)
        assert "kvmesh gateway listening on 127.0.0.1:" in output
        assert "Paris" in output  # the sample generation, greedy
        assert "(served by local-0)" in output
        base_url = re.search(r"OpenAI API at (http://\S+/v1)", output).group(1)
        check_openai_api(base_url)
        workers = children_of(proc.pid)
        assert workers, "no worker process"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        assert "Stopped." in proc.stdout.read()
        assert not [pid for pid in workers if Path(f"/proc/{pid}").exists() and _alive(pid)]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def check_openai_api(base_url: str) -> None:
    """The OpenAI client and curl against the gateway ``kvmesh up`` started."""
    import openai

    with openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=120) as client:
        answer = client.chat.completions.create(
            model="SmolLM2-135M-Instruct", max_tokens=12, temperature=0,
            messages=[{"role": "user", "content": "What is the capital of France?"}],
        )  # fmt: skip
        assert "Paris" in answer.choices[0].message.content
        assert answer.usage.prompt_tokens_details.cached_tokens >= 16  # the sample's prefix, routed to it
    out = subprocess.run(
        ["curl", "-sS", "-N", f"{base_url}/completions", "-d",
         '{"prompt": "The capital of France is", "max_tokens": 4, "temperature": 0, "stream": true}'],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    events = [line for line in out.stdout.splitlines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]" and "Paris" in "".join(events)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"
