"""The two gRPC services a worker serves over one AsyncEngine: ``kvmesh.v1.Inference``
(validation, streaming, cancellation) and ``kvmesh.v1.Worker`` (load and block events)."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import grpc

from kvmesh.v1 import inference_pb2, inference_pb2_grpc, worker_pb2, worker_pb2_grpc
from kvmesh.worker.engine.errors import EngineStopped, InvalidRequest, QueueFull
from kvmesh.worker.engine.sampling_params import SamplingParams
from kvmesh.worker.metrics import WorkerMetrics

if TYPE_CHECKING:
    from kvmesh.worker.engine.async_engine import AsyncEngine


logger = logging.getLogger("kvmesh.worker.servicers")

DEFAULT_MAX_TOKENS = 256  # the proto's documented default, clamped to the context left
SERVICES = ("", "kvmesh.v1.Inference", "kvmesh.v1.Worker")
FINISH_REASONS = {
    "stop": inference_pb2.FINISH_REASON_STOP,
    "length": inference_pb2.FINISH_REASON_LENGTH,
    "abort": inference_pb2.FINISH_REASON_ABORT,
}
ENGINE_ERRORS: dict[type[Exception], grpc.StatusCode] = {
    InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    QueueFull: grpc.StatusCode.RESOURCE_EXHAUSTED,
    EngineStopped: grpc.StatusCode.UNAVAILABLE,
}


class WorkerState:
    """What both services share: the engine once loaded, in-flight requests, drain state."""

    def __init__(self, worker_id: str, metrics: WorkerMetrics) -> None:
        self.worker_id = worker_id
        self.metrics = metrics
        self.engine: AsyncEngine | None = None
        self.draining = False
        self.engine_failed = asyncio.Event()  # set when the engine dies outside a shutdown
        self.in_flight: set[str] = set()
        self.idle = asyncio.Event()
        self.idle.set()
        self.subscriptions: set[Any] = set()

    async def engine_or_abort(
        self, context: grpc.aio.ServicerContext, generating: bool = False
    ) -> AsyncEngine:
        if self.engine is None:
            await self.reject(context, grpc.StatusCode.UNAVAILABLE, "the model is still loading")
        if generating and self.draining:
            await self.reject(context, grpc.StatusCode.UNAVAILABLE, "the worker is draining")
        return self.engine  # type: ignore[return-value]

    async def reject(self, context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str) -> None:
        self.metrics.observe_rejected(code.name)
        await context.abort(code, message)

    def begin(self, request_id: str) -> None:
        self.in_flight.add(request_id)
        self.idle.clear()

    def end(self, request_id: str) -> None:
        self.in_flight.discard(request_id)
        if not self.in_flight:
            self.idle.set()


def check_model(engine: AsyncEngine, model: str) -> None:
    if model and model != engine.model_name:
        raise InvalidRequest(f"unknown model {model!r}; this worker serves {engine.model_name!r}")


def chat_messages(chat: inference_pb2.ChatInput) -> list[dict[str, str]]:
    if not chat.messages:
        raise InvalidRequest("chat has no messages")
    if any(not m.role for m in chat.messages):
        raise InvalidRequest("every chat message needs a role")
    return [{"role": m.role, "content": m.content} for m in chat.messages]


def tokenize_chat(engine: AsyncEngine, chat: inference_pb2.ChatInput) -> list[int]:
    add_generation_prompt = chat.add_generation_prompt if chat.HasField("add_generation_prompt") else True
    # Template rejections already arrive as InvalidRequest (kvmesh.models.chat_token_ids).
    return engine.tokenize_chat(chat_messages(chat), add_generation_prompt=add_generation_prompt)


def prompt_token_ids(engine: AsyncEngine, request: inference_pb2.GenerateRequest) -> list[int]:
    kind = request.WhichOneof("input")
    if kind is None:
        raise InvalidRequest("the request has no input: set text, chat or token_ids")
    if kind == "text":
        if not request.text:
            raise InvalidRequest("the prompt is empty")
        return engine.tokenize_text(request.text)
    if kind == "chat":
        return tokenize_chat(engine, request.chat)
    if not request.token_ids.ids:
        raise InvalidRequest("the prompt is empty")
    return list(request.token_ids.ids)


def sampling_params(msg: inference_pb2.SamplingParams, prompt_len: int, max_model_len: int) -> SamplingParams:
    """Proto -> engine params; unset optional fields keep SamplingParams' defaults."""
    params = SamplingParams(
        stop=list(msg.stop), stop_token_ids=list(msg.stop_token_ids), ignore_eos=msg.ignore_eos
    )
    if msg.HasField("max_tokens"):
        params.max_tokens = msg.max_tokens
    else:  # the default never makes a valid prompt fail: it shrinks to the context left
        params.max_tokens = max(1, min(DEFAULT_MAX_TOKENS, max_model_len - prompt_len))
    if msg.HasField("temperature"):
        if not math.isfinite(msg.temperature):
            raise InvalidRequest(f"temperature must be a finite number >= 0, got {msg.temperature}")
        params.temperature = msg.temperature
    if msg.HasField("top_p"):
        params.top_p = msg.top_p
    if msg.HasField("top_k"):
        params.top_k = max(0, msg.top_k)
    if msg.HasField("seed"):
        params.seed = msg.seed
    return params


class InferenceServicer(inference_pb2_grpc.InferenceServicer):
    def __init__(self, state: WorkerState) -> None:
        self.state = state

    async def Generate(
        self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[inference_pb2.GenerateResponse]:
        state = self.state
        engine = await state.engine_or_abort(context, generating=True)
        arrival = time.perf_counter()
        request_id = request.request_id or uuid.uuid4().hex
        try:
            check_model(engine, request.model)
            prompt = prompt_token_ids(engine, request)
            params = sampling_params(request.sampling, len(prompt), engine.max_model_len)
        except InvalidRequest as e:
            await state.reject(context, grpc.StatusCode.INVALID_ARGUMENT, str(e))
        if request_id in state.in_flight:
            await state.reject(
                context, grpc.StatusCode.ALREADY_EXISTS, f"request {request_id} is already running"
            )

        stream = engine.generate(
            prompt, params, request_id, priority=request.priority, cache_salt=request.cache_salt
        )
        state.begin(request_id)
        admitted, finished, first_token_at = True, False, None
        try:
            async for out in stream:
                response = inference_pb2.GenerateResponse(
                    request_id=request_id, text=out.text, token_ids=out.token_ids
                )
                if first_token_at is None and out.token_ids:
                    first_token_at = time.perf_counter()
                    state.metrics.observe_first_token(first_token_at - arrival)
                if out.finished:
                    finished = True
                    self.finish(response, out, arrival, first_token_at)
                yield response
        except (InvalidRequest, QueueFull, EngineStopped) as e:
            admitted = False  # refused before admission (or the engine is gone): nothing to abort
            if isinstance(e, EngineStopped) and not state.draining:
                state.engine_failed.set()
            code = next(c for kind, c in ENGINE_ERRORS.items() if isinstance(e, kind))
            await state.reject(context, code, str(e))
        except asyncio.CancelledError:
            logger.debug("Cancelled request id=%s (client cancel or deadline)", request_id)
            state.metrics.observe_cancelled()
            raise
        except Exception:
            logger.exception("Request failed id=%s", request_id)
            await state.reject(
                context, grpc.StatusCode.INTERNAL, f"request {request_id} failed in the engine"
            )
        finally:
            # Also reached when grpc closes this generator after a cancelled write.
            if admitted and not finished:
                engine.abort(request_id)
            state.end(request_id)
            with contextlib.suppress(Exception):
                await stream.aclose()  # type: ignore[attr-defined]

    def finish(
        self, response: inference_pb2.GenerateResponse, out: Any, arrival: float, first_token_at: float | None
    ) -> None:
        """Fills the final message (finish reason, usage, worker) and records the request's latencies."""
        response.finish_reason = FINISH_REASONS.get(out.finish_reason or "", 0)
        response.usage.prompt_tokens = out.prompt_tokens
        response.usage.completion_tokens = out.completion_tokens
        response.usage.cached_tokens = out.cached_tokens
        response.worker_id = self.state.worker_id
        ttft = None if first_token_at is None else first_token_at - arrival
        e2e = time.perf_counter() - arrival
        self.state.metrics.observe_finished(out.finish_reason or "", ttft, e2e, out.completion_tokens)
        logger.debug(
            "Finished request id=%s reason=%s prompt=%d completion=%d cached=%d e2e=%.3fs",
            response.request_id, out.finish_reason, out.prompt_tokens, out.completion_tokens,
            out.cached_tokens, e2e,
        )  # fmt: skip

    async def Tokenize(
        self, request: inference_pb2.TokenizeRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.TokenizeResponse:
        engine = await self.state.engine_or_abort(context)
        add_special = request.add_special_tokens if request.HasField("add_special_tokens") else True
        try:
            check_model(engine, request.model)
            kind = request.WhichOneof("input")
            if kind is None:
                raise InvalidRequest("the request has no input: set text or chat")
            if kind == "text":
                ids = engine.tokenize_text(request.text, add_special_tokens=add_special)
            else:
                ids = tokenize_chat(engine, request.chat)
        except InvalidRequest as e:
            await self.state.reject(context, grpc.StatusCode.INVALID_ARGUMENT, str(e))
        return inference_pb2.TokenizeResponse(token_ids=ids)

    async def ListModels(
        self, request: inference_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.ListModelsResponse:
        engine = await self.state.engine_or_abort(context)
        info = inference_pb2.ModelInfo(
            id=engine.model_name, max_model_len=engine.max_model_len, block_size=engine.block_size
        )
        return inference_pb2.ListModelsResponse(models=[info])


class WorkerServicer(worker_pb2_grpc.WorkerServicer):
    def __init__(self, state: WorkerState) -> None:
        self.state = state

    def load_message(self, engine: AsyncEngine) -> worker_pb2.Load:
        load = engine.load()
        return worker_pb2.Load(
            worker_id=self.state.worker_id,
            running=load.running,
            waiting=load.waiting,
            kv_usage=load.kv_usage,
            num_blocks=load.num_blocks,
            block_size=load.block_size,
            model=engine.model_name,
        )

    async def GetLoad(
        self, request: worker_pb2.GetLoadRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.Load:
        return self.load_message(await self.state.engine_or_abort(context))

    async def WatchBlocks(
        self, request: worker_pb2.WatchBlocksRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[worker_pb2.BlockEvents]:
        engine = await self.state.engine_or_abort(context)
        subscription = engine.subscribe_blocks()
        self.state.subscriptions.add(subscription)
        try:
            async for event in subscription:
                yield worker_pb2.BlockEvents(
                    worker_id=self.state.worker_id,
                    stored=event.stored,
                    removed=event.removed,
                    snapshot=event.snapshot,
                    load=self.load_message(engine),
                )
        finally:
            self.state.subscriptions.discard(subscription)
            await close_subscription(subscription)


async def close_subscription(subscription: Any) -> None:
    result = subscription.close()
    if inspect.isawaitable(result):
        await result
