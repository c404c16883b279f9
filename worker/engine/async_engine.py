"""The engine behind the gRPC server: a step loop on its own thread, asyncio streams in front.

Only the engine thread touches engine state. Callers post commands (add, abort,
subscribe) to an inbox; the thread drains it between steps and hands each
request's deltas back to the event loop with ``call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator
from typing import Any

from kvmesh.models import chat_token_ids
from kvmesh.worker.engine.config import EngineConfig
from kvmesh.worker.engine.errors import EngineStopped, InvalidRequest, QueueFull
from kvmesh.worker.engine.llm_engine import LLMEngine
from kvmesh.worker.engine.outputs import BlockEvent, EngineStats, LoadStats, StepOutput
from kvmesh.worker.engine.sampling_params import SamplingParams

log = logging.getLogger(__name__)


class BlockSubscription:
    """Async iterator of BlockEvent; the first one is a snapshot of the cache."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self.queue: asyncio.Queue[BlockEvent | None] = asyncio.Queue()

    def __aiter__(self) -> BlockSubscription:
        return self

    async def __anext__(self) -> BlockEvent:
        event = await self.queue.get()
        if event is None:
            raise StopAsyncIteration
        return event

    def close(self) -> None:
        self._engine._post(("unsubscribe", self))
        self.queue.put_nowait(None)


class AsyncEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.engine = LLMEngine(config)
        self.config = config
        self.model_name = self.engine.model_name
        self.max_model_len = self.engine.max_model_len
        self.block_size = self.engine.block_size
        self.vocab_size = self.engine.vocab_size
        self.tokenizer = self.engine.tokenizer
        self._inbox: queue.Queue[tuple[Any, ...]] = queue.Queue()
        self._streams: dict[str, asyncio.Queue[StepOutput | BaseException]] = {}
        self._subscribers: list[BlockSubscription] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopped = False
        self._failed: asyncio.Event | None = None

    # -- lifecycle -------------------------------------------------------
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._failed = asyncio.Event()
        self._thread = threading.Thread(target=self._run, name="kvmesh-engine", daemon=True)
        self._thread.start()

    async def shutdown(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._post(("stop",))
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)

    async def wait_failed(self) -> None:
        """Returns once the step thread has died of an error (never after a clean shutdown)."""
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
        if self._stopped or self._thread is None:
            raise EngineStopped("the engine is not running")
        if request_id in self._streams:
            raise InvalidRequest(f"request id {request_id!r} is already running")
        seq = self.engine.make_sequence(request_id, prompt_token_ids, params, priority, cache_salt)
        if self.engine.scheduler.num_waiting + self._inbox.qsize() >= self.config.max_waiting:
            raise QueueFull(f"{self.config.max_waiting} requests are already waiting")
        stream: asyncio.Queue[StepOutput | BaseException] = asyncio.Queue()
        self._streams[request_id] = stream
        self._post(("add", seq))
        finished = False
        try:
            while True:
                item = await stream.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished:  # the caller went away (cancel, deadline, error): free its blocks
                self._post(("abort", request_id))

    def abort(self, request_id: str) -> None:
        self._post(("abort", request_id))

    def load(self) -> LoadStats:
        return self.engine.load()

    def stats(self) -> EngineStats:
        return self.engine.stats

    def subscribe_blocks(self) -> BlockSubscription:
        sub = BlockSubscription(self)
        self._post(("subscribe", sub))
        return sub

    # -- engine thread ---------------------------------------------------
    def _post(self, command: tuple[Any, ...]) -> None:
        self._inbox.put(command)

    def _run(self) -> None:
        engine = self.engine
        try:
            while True:
                block = not engine.has_work()
                while True:
                    try:
                        command = self._inbox.get(block=block, timeout=None if block else 0)
                    except queue.Empty:
                        break
                    block = False
                    if command[0] == "stop":
                        self._fail_all(EngineStopped("the engine stopped"))
                        return
                    self._handle(command)
                if not engine.has_work():
                    continue
                outputs = engine.step()
                self._publish_blocks()
                for out in outputs:
                    self._deliver(out)
        except BaseException as e:  # a model failure must not leave clients waiting forever
            log.exception("Engine step failed; failing all requests")
            self._stopped = True
            self._fail_all(EngineStopped(f"the engine failed: {e}"))
            if self._failed is not None:
                self._call(self._failed.set)

    def _handle(self, command: tuple[Any, ...]) -> None:
        kind = command[0]
        if kind == "add":
            seq = command[1]
            try:
                self.engine.add(seq)
            except InvalidRequest as e:
                self._deliver_error(seq.request_id, e)
        elif kind == "abort":
            out = self.engine.abort(command[1])
            if out is not None:
                self._deliver(out)
                self._publish_blocks()
        elif kind == "subscribe":
            sub = command[1]
            self._subscribers.append(sub)
            snapshot = BlockEvent(stored=self.engine.block_manager.cached_hashes(), snapshot=True)
            self._call(sub.queue.put_nowait, snapshot)
        elif kind == "unsubscribe" and command[1] in self._subscribers:
            self._subscribers.remove(command[1])

    def _publish_blocks(self) -> None:
        stored, removed = self.engine.block_manager.drain_events()
        if not (stored or removed) or not self._subscribers:
            return
        for sub in self._subscribers:
            self._call(sub.queue.put_nowait, BlockEvent(stored=list(stored), removed=list(removed)))

    def _deliver(self, out: StepOutput) -> None:
        self._call(self._put_output, out.request_id, out)

    def _deliver_error(self, request_id: str, error: BaseException) -> None:
        self._call(self._put_output, request_id, error)

    def _put_output(self, request_id: str, item: StepOutput | BaseException) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            stream.put_nowait(item)

    def _call(self, fn, *args) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(fn, *args)

    def _fail_all(self, error: BaseException) -> None:
        for request_id in list(self.engine.seqs):
            self.engine.abort(request_id)
        for request_id in list(self._streams):
            self._call(self._put_output, request_id, error)
        for sub in self._subscribers:
            self._call(sub.queue.put_nowait, None)
