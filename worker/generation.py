"""The worker's one request path, shared by its gRPC and HTTP fronts: check a ``GenerateRequest``,
tokenize it, stream it through the engine as ``GenerateResponse`` messages, and on any exit (client
gone, deadline, error) abort the sequence so its KV blocks are freed.

The fronts only translate: gRPC aborts with ``RequestError.code``, HTTP maps it to a status. This
module talks to the engine core through worker/engine/client.py: nothing here depends on which
protocol asked.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import grpc

from kvmesh.requests import (
    DEFAULT_MAX_TOKENS,
    RequestError,
    add_generation_prompt,
    chat_messages,
    check_sampling,
    check_size,
    prompt_token_ids,
)
from kvmesh.v1 import inference_pb2
from kvmesh.worker.engine.errors import EngineStopped, InvalidRequest, QueueFull
from kvmesh.worker.engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from kvmesh.worker.engine.client import EngineClient
    from kvmesh.worker.servicers import WorkerState

logger = logging.getLogger("kvmesh.worker.generation")

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


def engine_error(e: Exception) -> RequestError:
    code = next(c for kind, c in ENGINE_ERRORS.items() if isinstance(e, kind))
    return RequestError(code, str(e))


def ready_engine(state: WorkerState, generating: bool = False) -> EngineClient:
    if state.engine is None:
        raise RequestError(grpc.StatusCode.UNAVAILABLE, "the model is still loading")
    if generating and state.draining:
        raise RequestError(grpc.StatusCode.UNAVAILABLE, "the worker is draining")
    return state.engine


def check_model(engine: EngineClient, model: str) -> None:
    if model and model != engine.model_name:
        raise RequestError(
            grpc.StatusCode.NOT_FOUND,
            f"unknown model {model!r}; this worker serves {engine.model_name!r}",
        )


def sampling_params(msg: inference_pb2.SamplingParams, prompt_len: int, max_model_len: int) -> SamplingParams:
    """Proto -> engine params; unset optional fields keep SamplingParams' defaults."""
    check_sampling(msg)
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
    if msg.HasField("logprobs"):
        params.logprobs = msg.logprobs
    return params


async def generate(
    state: WorkerState, request: inference_pb2.GenerateRequest
) -> AsyncIterator[inference_pb2.GenerateResponse]:
    """Streams one request's deltas; the last message carries finish reason and usage. Raises
    ``RequestError`` before the first message when the request is refused."""
    try:
        engine = ready_engine(state, generating=True)
        request_id = request.request_id or uuid.uuid4().hex
        check_model(engine, request.model)
        check_size(request, state.max_request_bytes)
        prompt = await state.off_loop(request.ByteSize(), prompt_token_ids, engine, request)
        params = sampling_params(request.sampling, len(prompt), engine.max_model_len)
        if request_id in state.in_flight:
            raise RequestError(grpc.StatusCode.ALREADY_EXISTS, f"request {request_id} is already running")
    except InvalidRequest as e:
        state.metrics.observe_rejected("INVALID_ARGUMENT")
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from e
    except RequestError as e:
        state.metrics.observe_rejected(e.code.name)
        raise

    arrival = time.perf_counter()
    stream = engine.generate(
        prompt, params, request_id, priority=request.priority, cache_salt=request.cache_salt
    )
    state.begin(request_id)
    first_token_at = None
    try:
        async for out in stream:
            response = inference_pb2.GenerateResponse(
                request_id=request_id, text=out.text, token_ids=out.token_ids
            )
            if out.logprobs:
                add_logprobs(response, out.logprobs, engine)
            if first_token_at is None and out.token_ids:
                first_token_at = time.perf_counter()
                state.metrics.observe_first_token(first_token_at - arrival)
            if out.finished:
                finish(state, response, out, arrival, first_token_at)
            yield response
    except (InvalidRequest, QueueFull, EngineStopped) as e:
        if isinstance(e, EngineStopped) and not state.draining:
            state.engine_failed.set()
        error = engine_error(e)
        state.metrics.observe_rejected(error.code.name)
        raise error from e
    except asyncio.CancelledError:
        logger.debug("Cancelled request id=%s (client cancel or deadline)", request_id)
        state.metrics.observe_cancelled()
        raise
    except Exception as e:
        logger.exception("Request failed id=%s", request_id)
        state.metrics.observe_rejected("INTERNAL")
        raise RequestError(grpc.StatusCode.INTERNAL, f"request {request_id} failed in the engine") from e
    finally:
        # Also reached when a front closes this generator after its client went away. Closing the
        # engine's stream aborts the sequence (the client owns aborts), freeing its blocks.
        state.end(request_id)
        with contextlib.suppress(Exception):
            await stream.aclose()  # type: ignore[attr-defined]


def add_logprobs(response: inference_pb2.GenerateResponse, logprobs: list[Any], engine: EngineClient) -> None:
    decode = token_text(engine.tokenizer)
    for lp in logprobs:
        entry = response.logprobs.add(token_id=lp.token_id, logprob=lp.logprob, token=decode(lp.token_id))
        for token_id, value in lp.top:
            entry.top.add(token_id=token_id, logprob=value, token=decode(token_id))


@functools.cache
def token_text(tokenizer: Any):
    """A per-tokenizer cache of single-token decodes (logprob entries repeat the same few ids)."""
    return functools.lru_cache(maxsize=65536)(lambda token_id: tokenizer.decode([token_id]))


def finish(
    state: WorkerState,
    response: inference_pb2.GenerateResponse,
    out: Any,
    arrival: float,
    first: float | None,
) -> None:
    """Fills the final message (finish reason, usage, worker) and records the request's latencies."""
    response.finish_reason = FINISH_REASONS.get(out.finish_reason or "", 0)
    response.usage.prompt_tokens = out.prompt_tokens
    response.usage.completion_tokens = out.completion_tokens
    response.usage.cached_tokens = out.cached_tokens
    response.worker_id = state.worker_id
    ttft = None if first is None else first - arrival
    e2e = time.perf_counter() - arrival
    state.metrics.observe_finished(out.finish_reason or "", ttft, e2e, out.completion_tokens)
    logger.debug(
        "Finished request id=%s reason=%s prompt=%d completion=%d cached=%d e2e=%.3fs",
        response.request_id, out.finish_reason, out.prompt_tokens, out.completion_tokens,
        out.cached_tokens, e2e,
    )  # fmt: skip


async def tokenize(state: WorkerState, request: inference_pb2.TokenizeRequest) -> list[int]:
    engine = ready_engine(state)
    add_special = request.add_special_tokens if request.HasField("add_special_tokens") else True
    try:
        check_model(engine, request.model)
        check_size(request, state.max_request_bytes)
        kind = request.WhichOneof("input")
        if kind is None:
            raise InvalidRequest("the request has no input: set text or chat")
        if kind == "text":
            return await state.off_loop(request.ByteSize(), engine.tokenize_text, request.text, add_special)
        messages = chat_messages(request.chat)
        prompt = add_generation_prompt(request.chat)
        return await state.off_loop(request.ByteSize(), engine.tokenize_chat, messages, prompt)
    except InvalidRequest as e:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from e


def list_models(state: WorkerState) -> list[inference_pb2.ModelInfo]:
    engine = ready_engine(state)
    return [
        inference_pb2.ModelInfo(
            id=engine.model_name, max_model_len=engine.max_model_len, block_size=engine.block_size
        )
    ]
