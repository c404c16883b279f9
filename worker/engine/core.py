"""The engine core: the step loop in a process of its own.

The worker's front (gRPC, HTTP, tokenizing, detokenizing, protobuf) runs in the parent process
(worker/engine/client.py); this process only schedules and runs model steps, so nothing competes
with the step loop for its interpreter. The two talk over a Unix socket pair, one frame per
message (an 8-byte length, then a pickled tuple):

front -> core   ("add", request_id, prompt_token_ids, SamplingParams, priority, cache_salt)
                ("abort", request_id)
                ("stop",)
core -> front   ("ready", facts)              once the model is loaded
                ("error", message)            loading failed; the process then exits 1
                ("update", Update)            after each step, or after commands changed state
                ("failed", message)           a step raised; the process then exits 1

Between steps the core drains every pending command; with no work it blocks on the socket. The
core is the only reader and writer of engine state. It exits when told to stop, when the front's
end of the socket closes, or when its parent process goes away.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import pickle
import select
import signal
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("kvmesh.worker.engine.core")

HEADER = struct.Struct("!Q")


def encode(message: Any) -> bytes:
    """A frame: the pickled message behind its length."""
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return HEADER.pack(len(data)) + data


class Link:
    """The core's end of the socket: blocking frames, and a poll for pending ones."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def send(self, message: Any) -> None:
        self.sock.sendall(encode(message))

    def poll(self, timeout: float | None) -> bool:
        return bool(select.select([self.sock], [], [], timeout)[0])

    def recv(self) -> Any:
        (size,) = HEADER.unpack(self._exactly(HEADER.size))
        return pickle.loads(self._exactly(size))

    def _exactly(self, size: int) -> bytearray:
        buf = bytearray(size)
        view, got = memoryview(buf), 0
        while got < size:
            n = self.sock.recv_into(view[got:])
            if n == 0:
                raise EOFError("the worker's front closed the socket")
            got += n
        return buf


# One output of a step, as a plain tuple (the cheapest thing to pickle for hundreds of streams):
# (request_id, new token ids, finished, finish_reason, prompt_tokens, completion_tokens,
#  cached_tokens, logprobs or None)
Output = tuple


@dataclass(slots=True)
class FinishedTimes:
    """A finished request's phases, for the front's request metrics (monotonic clock, shared by
    the two processes on one host)."""

    num_prompt_tokens: int
    num_completion_tokens: int
    added_time: float
    first_scheduled_time: float | None
    first_token_time: float | None
    last_token_time: float | None


@dataclass(slots=True)
class Update:
    """What changed since the last update: outputs, refused requests, prefix-cache events, and the
    engine's load and counters as of now."""

    outputs: list[Output] = field(default_factory=list)
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (request_id, message)
    stored: list[int] = field(default_factory=list)
    removed: list[int] = field(default_factory=list)
    steps: list[tuple[int, list[float]]] = field(default_factory=list)  # (tokens, inter-token gaps)
    finished: list[FinishedTimes] = field(default_factory=list)
    load: Any = None  # LoadStats
    stats: Any = None  # EngineStats


class _Recorder:
    """The engine's metrics sink inside the core: collects observations for the next update."""

    def __init__(self) -> None:
        self.steps: list[tuple[int, list[float]]] = []
        self.finished: list[FinishedTimes] = []

    def on_step(self, num_tokens: int, inter_token_latencies: list[float]) -> None:
        self.steps.append((num_tokens, inter_token_latencies))

    def on_finished(self, seq: Any) -> None:
        self.finished.append(
            FinishedTimes(
                seq.num_prompt_tokens,
                seq.num_completion_tokens,
                seq.added_time,
                seq.first_scheduled_time,
                seq.first_token_time,
                seq.last_token_time,
            )
        )


def pack(out: Any) -> Output:
    return (
        out.request_id,
        out.token_ids,
        out.finished,
        out.finish_reason,
        out.prompt_tokens,
        out.completion_tokens,
        out.cached_tokens,
        out.logprobs,
    )


class EngineCore:
    def __init__(self, engine: Any, conn: Link) -> None:
        self.engine = engine
        self.conn = conn
        self.recorder = _Recorder()
        engine.metrics_sink = self.recorder
        self.update = Update()
        self.dirty = False

    def run(self) -> None:
        engine = self.engine
        while True:
            # Block only when there is nothing to step; otherwise take what has arrived.
            if not engine.has_work():
                self.conn.poll(None)
            while self.conn.poll(0):
                command = self.conn.recv()
                if command[0] == "stop":
                    self._abort_all()
                    self._flush()
                    return
                self._handle(command)
            if engine.has_work():
                self.update.outputs.extend(pack(out) for out in engine.step())
                self.dirty = True
            if self.dirty:
                self._flush()

    def _handle(self, command: tuple) -> None:
        from kvmesh.worker.engine.errors import InvalidRequest

        kind = command[0]
        self.dirty = True
        if kind == "add":
            _, request_id, prompt, params, priority, cache_salt = command
            try:
                self.engine.add(self.engine.make_sequence(request_id, prompt, params, priority, cache_salt))
            except InvalidRequest as e:
                self.update.rejected.append((request_id, str(e)))
        elif kind == "abort":
            out = self.engine.abort(command[1])
            if out is not None:
                self.update.outputs.append(pack(out))
        else:
            raise ValueError(f"unknown engine core command {kind!r}")

    def _abort_all(self) -> None:
        for request_id in list(self.engine.seqs):
            out = self.engine.abort(request_id)
            if out is not None:
                self.update.outputs.append(pack(out))

    def _flush(self) -> None:
        update = self.update
        update.stored, update.removed = self.engine.block_manager.drain_events()
        update.steps, self.recorder.steps = self.recorder.steps, []
        update.finished, self.recorder.finished = self.recorder.finished, []
        update.load = self.engine.load()
        update.stats = self.engine.stats
        self.conn.send(("update", update))
        self.update = Update()
        self.dirty = False


def facts(engine: Any) -> dict[str, Any]:
    """What the front needs to know of the loaded engine."""
    return {
        "model_name": engine.model_name,
        "max_model_len": engine.max_model_len,
        "block_size": engine.block_size,
        "vocab_size": engine.vocab_size,
        "num_blocks": engine.block_manager.num_blocks,
        "generation_defaults": engine.generation_defaults,
        "model_dir": str(engine.model_dir),
    }


def _watch_parent(parent: int) -> None:
    """Exits at once when the parent process is gone (killed, or exited while the model loads)."""
    while True:
        if os.getppid() != parent:
            os._exit(1)
        time.sleep(0.5)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="kvmesh engine core (started by `kvmesh worker`)")
    parser.add_argument("--fd", type=int, required=True, help="the socket shared with the front")
    parser.add_argument("--parent", type=int, required=True, help="the front's process id")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    # Ctrl-C reaches the whole process group; the front decides when the core stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    threading.Thread(target=_watch_parent, args=(args.parent,), name="kvmesh-parent", daemon=True).start()
    from kvmesh.logs import setup_logging

    setup_logging(args.log_level)
    conn = Link(socket.socket(fileno=args.fd))
    try:
        kind, config_fields = conn.recv()
        assert kind == "config", kind
        from kvmesh.worker.engine.config import EngineConfig
        from kvmesh.worker.engine.llm_engine import LLMEngine

        engine = LLMEngine(EngineConfig(**config_fields), detokenize=False)
    except EOFError:
        return 1
    except BaseException as e:
        log.exception("Engine core failed to load the model")
        conn.send(("error", f"{type(e).__name__}: {e}"))
        return 1
    conn.send(("ready", facts(engine)))
    try:
        EngineCore(engine, conn).run()
    except (EOFError, BrokenPipeError, ConnectionResetError):
        log.info("The worker's front went away; engine core exiting")
        return 1
    except BaseException as e:  # a model failure: tell the front, which fails its requests and exits
        log.exception("Engine step failed")
        with contextlib.suppress(OSError):
            conn.send(("failed", f"{type(e).__name__}: {e}"))
        return 1
    return 0
