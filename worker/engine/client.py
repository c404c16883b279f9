"""The worker front's handle on its engine core (worker/engine/core.py, a child process).

The front owns everything whose cost grows with the number of streams rather than with the
model: tokenizing, detokenizing, stop strings, protobuf. The core owns engine state; the front
knows it only from the core's updates (load, counters, prefix-cache events), which it mirrors.

The socket is driven by the event loop itself (asyncio streams: writes are buffered, so a burst of
long prompts never blocks the loop on a full socket; one task reads updates), so no message waits
for a thread to be scheduled. All per-request state lives on the event loop.

Aborts have one owner: ``generate()``. A stream that ends for any reason other than its own
finish (the caller went away, a stop string was found, the worker drains) aborts its sequence in
the core exactly once, which frees its KV blocks.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pickle
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from kvmesh.models import chat_token_ids
from kvmesh.worker.engine.config import EngineConfig
from kvmesh.worker.engine.core import HEADER, FinishedTimes, Link, Update, encode
from kvmesh.worker.engine.detokenizer import IncrementalDetokenizer
from kvmesh.worker.engine.errors import EngineStopped, InvalidRequest, QueueFull
from kvmesh.worker.engine.llm_engine import check_request
from kvmesh.worker.engine.outputs import BlockEvent, EngineStats, LoadStats, StepOutput
from kvmesh.worker.engine.sampling_params import SamplingParams
from kvmesh.worker.model import loader

log = logging.getLogger(__name__)
# Not ``-m``: the core's classes must pickle under their module's name, not as __main__'s. The
# core leaves through os._exit once its streams are flushed: tearing down torch's interpreter
# state can take seconds on a busy machine and there is nothing left to save.
CORE_MAIN = (
    "import os, sys; from kvmesh.worker.engine.core import main; code = main(sys.argv[1:]); "
    "sys.stdout.flush(); sys.stderr.flush(); os._exit(code)"
)
STOP_TIMEOUT = 10.0  # seconds the core gets to finish after "stop" before it is killed


class BlockSubscription:
    """Async iterator of BlockEvent; the first one is a snapshot of the cache."""

    def __init__(self, client: EngineClient) -> None:
        self._client = client
        self.queue: asyncio.Queue[BlockEvent | None] = asyncio.Queue()

    def __aiter__(self) -> BlockSubscription:
        return self

    async def __anext__(self) -> BlockEvent:
        event = await self.queue.get()
        if event is None:
            raise StopAsyncIteration
        return event

    def close(self) -> None:
        self._client._subscribers.discard(self)
        self.queue.put_nowait(None)


@dataclass(slots=True)
class _Request:
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    started: bool = False  # the core has sent something for it
    done: bool = False  # finished, refused or aborted: no abort is sent any more


class EngineClient:
    """The engine as the worker's fronts see it. Construct it off the event loop (it converts the
    model if needed and waits for the core to load it), then ``start()`` on the loop."""

    def __init__(self, config: EngineConfig) -> None:
        config.validate()
        self.config = config
        files = loader.resolve_model(config.model)  # converts a GGUF file once, here in the front
        core_config = replace(
            config, model=str(files.directory), served_model_name=config.served_model_name or files.name
        )
        front, back = socket.socketpair()
        self._process = subprocess.Popen(
            [
                sys.executable, "-c", CORE_MAIN,
                "--fd", str(back.fileno()),
                "--parent", str(os.getpid()),
                "--log-level", logging.getLevelName(logging.getLogger().getEffectiveLevel()),
            ],
            pass_fds=(back.fileno(),),
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
        back.close()
        self._socket = front
        handshake = Link(front)  # blocking until start(): this runs off the event loop
        handshake.send(("config", asdict(core_config)))
        self.tokenizer = loader.load_tokenizer(files.directory)  # while the core loads the model
        try:
            reply = handshake.recv()
        except (EOFError, OSError):
            reply = ("error", f"the engine core exited with code {self._process.wait()} while loading")
        if reply[0] != "ready":
            self._process.wait()
            raise RuntimeError(reply[1])
        facts = reply[1]
        self.model_name: str = facts["model_name"]
        self.max_model_len: int = facts["max_model_len"]
        self.block_size: int = facts["block_size"]
        self.vocab_size: int = facts["vocab_size"]
        self.generation_defaults: dict = facts["generation_defaults"]
        self._load = LoadStats(0, 0, 0.0, facts["num_blocks"], self.block_size)
        self._stats = EngineStats()
        self._cached: set[int] = set()  # the core's prefix cache, mirrored from its events
        self._requests: dict[str, _Request] = {}
        self._subscribers: set[BlockSubscription] = set()
        self._writer: asyncio.StreamWriter | None = None
        self._reading: asyncio.Task | None = None
        self._failed: asyncio.Event | None = None
        self._stopped = False
        self.metrics_sink: Any = None  # worker/engine_metrics.EngineSink, set by the worker's metrics

    # -- lifecycle -------------------------------------------------------
    async def start(self) -> None:
        self._failed = asyncio.Event()
        self._socket.setblocking(False)
        reader, self._writer = await asyncio.open_unix_connection(sock=self._socket, limit=1 << 20)
        self._reading = asyncio.ensure_future(self._read(reader))

    async def shutdown(self) -> None:
        """Stops the core (aborting what it still runs) and waits for it to exit."""
        if self._stopped:
            return
        self._stopped = True
        self._send(("stop",))
        try:
            await asyncio.wait_for(asyncio.to_thread(self._process.wait), STOP_TIMEOUT)
        except asyncio.TimeoutError:
            log.warning("Engine core did not stop within %.0fs; killing it", STOP_TIMEOUT)
            self._process.kill()
            await asyncio.to_thread(self._process.wait)
        if self._reading is not None:
            await asyncio.wait({self._reading}, timeout=1.0)  # the final update, if any
            self._reading.cancel()
        self._fail_all(EngineStopped("the engine stopped"))
        if self._writer is not None:
            self._writer.close()

    async def wait_failed(self) -> None:
        """Returns once the core has died or failed (never after a clean shutdown)."""
        assert self._failed is not None, "start() the engine first"
        await self._failed.wait()

    # -- public API ------------------------------------------------------
    def tokenize_text(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def tokenize_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
        try:
            return chat_token_ids(self.tokenizer, messages, add_generation_prompt)
        except ValueError as e:
            raise InvalidRequest(str(e)) from e

    async def generate(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        request_id: str,
        priority: int = 0,
        cache_salt: str = "",
    ) -> AsyncIterator[StepOutput]:
        """Streams the request's deltas (with text); raises InvalidRequest, QueueFull or
        EngineStopped before the first one when the request cannot run."""
        if self._stopped or self._writer is None:
            raise EngineStopped("the engine is not running")
        if request_id in self._requests:
            raise InvalidRequest(f"request id {request_id!r} is already running")
        params = check_request(
            prompt_token_ids, params, self.vocab_size, self.max_model_len, self.generation_defaults
        )
        if sum(not r.started for r in self._requests.values()) >= self.config.max_waiting:
            raise QueueFull(f"{self.config.max_waiting} requests are already waiting")
        request = self._requests[request_id] = _Request()
        detok = IncrementalDetokenizer(self.tokenizer, prompt_token_ids, params.stop)
        self._send(("add", request_id, prompt_token_ids, params, priority, cache_salt))
        try:
            while True:
                item = await request.queue.get()
                items = [item]
                while not request.queue.empty():  # behind: send what has piled up as one delta
                    items.append(request.queue.get_nowait())
                out, request.done = self._merge(items, detok)
                yield out
                if out.finished:
                    return
        finally:
            self._requests.pop(request_id, None)
            if not request.done:  # the caller went away (cancel, deadline, drain) or a stop string
                self._send_abort(request_id)

    def _merge(self, items: list, detok: IncrementalDetokenizer) -> tuple[StepOutput, bool]:
        """One delta from the core outputs that have arrived for a request (text and stop strings
        are worked out here), and whether the core has finished the request itself."""
        token_ids: list[int] = []
        logprobs: list | None = None
        last = None
        for item in items:
            if isinstance(item, BaseException):
                raise item
            last = item
            for i, token in enumerate(item[1]):
                token_ids.append(token)
                if item[7] is not None:
                    logprobs = logprobs if logprobs is not None else []
                    logprobs.append(item[7][i])
                if detok.add(token):  # a stop string: the stream ends at this token
                    out = self._output(item, token_ids, detok.take(final=True), logprobs)
                    out.finished, out.finish_reason = True, "stop"
                    out.completion_tokens -= len(item[1]) - i - 1
                    return out, bool(item[2]) and i == len(item[1]) - 1
            if item[2]:
                break
        assert last is not None
        out = self._output(last, token_ids, detok.take(final=bool(last[2])), logprobs)
        out.finished, out.finish_reason = bool(last[2]), last[3]
        return out, out.finished

    @staticmethod
    def _output(item: tuple, token_ids: list[int], text: str, logprobs: list | None) -> StepOutput:
        return StepOutput(
            request_id=item[0],
            text=text,
            token_ids=token_ids,
            prompt_tokens=item[4],
            completion_tokens=item[5],
            cached_tokens=item[6],
            logprobs=logprobs,
        )

    def abort(self, request_id: str) -> None:
        """Ends a running request: its stream gets a final ``abort`` delta."""
        if request_id in self._requests:
            self._send_abort(request_id)

    def _send_abort(self, request_id: str) -> None:
        if not self._stopped:
            self._send(("abort", request_id))

    def _send(self, command: tuple) -> None:
        writer = self._writer
        if writer is not None and not writer.is_closing():
            writer.write(encode(command))  # buffered by the transport: never blocks the loop

    def load(self) -> LoadStats:
        return self._load

    def stats(self) -> EngineStats:
        return self._stats

    def subscribe_blocks(self) -> BlockSubscription:
        sub = BlockSubscription(self)
        sub.queue.put_nowait(BlockEvent(stored=list(self._cached), snapshot=True))
        self._subscribers.add(sub)
        return sub

    # -- the core's socket ----------------------------------------------
    async def _read(self, reader: asyncio.StreamReader) -> None:
        error = "the engine core exited"
        try:
            while True:
                (size,) = HEADER.unpack(await reader.readexactly(HEADER.size))
                message = pickle.loads(await reader.readexactly(size))
                if message[0] == "failed":
                    error = f"the engine failed: {message[1]}"
                    break
                self._apply(message[1])
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        except Exception as e:  # an update that cannot be read: the two sides disagree
            log.exception("Unreadable message from the engine core")
            error = f"unreadable message from the engine core: {e}"
            self._process.kill()
        code = await asyncio.to_thread(self._process.wait)
        self._core_gone(f"{error} (exit code {code})")

    def _apply(self, update: Update) -> None:
        for item in update.outputs:
            request = self._requests.get(item[0])
            if request is not None:
                request.started = True
                request.queue.put_nowait(item)
        for request_id, message in update.rejected:
            request = self._requests.get(request_id)
            if request is not None:
                request.done = True
                request.queue.put_nowait(InvalidRequest(message))
        if update.stored or update.removed:
            self._cached.difference_update(update.removed)
            self._cached.update(update.stored)
            for sub in self._subscribers:
                sub.queue.put_nowait(BlockEvent(stored=list(update.stored), removed=list(update.removed)))
        self._load, self._stats = update.load, update.stats
        sink = self.metrics_sink
        if sink is not None:
            for tokens, gaps in update.steps:
                sink.on_step(tokens, gaps)
            for times in update.finished:
                sink.on_finished(times)

    def _core_gone(self, reason: str) -> None:
        if self._stopped:
            return
        log.error("Engine core stopped: %s", reason)
        self._stopped = True
        self._fail_all(EngineStopped(reason))
        if self._failed is not None:
            self._failed.set()

    def _fail_all(self, error: BaseException) -> None:
        for request in self._requests.values():
            request.done = True
            request.queue.put_nowait(error)
        for sub in list(self._subscribers):
            sub.close()


__all__ = ["BlockSubscription", "EngineClient", "FinishedTimes"]
