"""The worker's gRPC server: ``kvmesh.v1.Inference`` and ``kvmesh.v1.Worker`` over one AsyncEngine.

Lifecycle: the port opens at once with health NOT_SERVING (so probes and clients get a clear
answer), the model loads in a thread, then health turns SERVING. SIGTERM/SIGINT drains: health
NOT_SERVING, new generations refused with UNAVAILABLE, in-flight ones finish within the grace
period and are aborted after it. A cancelled or expired call aborts its sequence in the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import math
import signal
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from kvmesh.rpc import SERVER_OPTIONS
from kvmesh.v1 import inference_pb2, inference_pb2_grpc, worker_pb2, worker_pb2_grpc
from kvmesh.worker.engine.errors import EngineStopped, InvalidRequest, QueueFull
from kvmesh.worker.engine.sampling_params import SamplingParams
from kvmesh.worker.metrics import WorkerMetrics

if TYPE_CHECKING:
    from kvmesh.worker.engine.async_engine import AsyncEngine

logger = logging.getLogger("kvmesh.worker.server")

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


@dataclass(slots=True)
class ServerOptions:
    host: str = "127.0.0.1"
    port: int = 50051
    worker_id: str = ""
    advertise_address: str = ""  # host:port others dial; default host:port
    deployment: str = "default"
    redis_url: str = ""
    metrics_port: int = 0  # 0: no metrics endpoint
    shutdown_grace: float = 25.0  # seconds in-flight requests get after SIGTERM


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
    messages = chat_messages(chat)
    try:
        return engine.tokenize_chat(messages, add_generation_prompt=add_generation_prompt)
    except InvalidRequest:
        raise
    except Exception as e:  # the model's Jinja template rejects a conversation with an exception
        raise InvalidRequest(f"the chat template rejected the messages: {e}") from e


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


async def load_in_thread(factory: Callable[[], AsyncEngine]) -> AsyncEngine:
    """Runs the slow model load in a daemon thread, so SIGTERM during loading still exits promptly."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[AsyncEngine] = loop.create_future()

    def settle(result: Any, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def target() -> None:
        try:
            engine = factory()
        except BaseException as e:
            loop.call_soon_threadsafe(settle, None, e)
        else:
            loop.call_soon_threadsafe(settle, engine, None)

    threading.Thread(target=target, name="kvmesh-model-load", daemon=True).start()
    return await future


def host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def default_advertise_address(host: str, port: int) -> str:
    """host:port for others to dial; a wildcard listen address is replaced by this host's address."""
    if host not in ("", "0.0.0.0", "::", "[::]"):
        return host_port(host, port)
    try:
        return host_port(socket.gethostbyname(socket.gethostname()), port)
    except OSError:
        return host_port(socket.gethostname(), port)


async def set_health(servicer: health.aio.HealthServicer, status: int) -> None:
    for service in SERVICES:
        await servicer.set(service, status)


async def serve(options: ServerOptions, engine_factory: Callable[[], AsyncEngine]) -> int:
    """Serves until SIGTERM/SIGINT, then drains; returns the process exit code."""
    metrics = WorkerMetrics()
    state = WorkerState(options.worker_id, metrics)
    health_servicer = health.aio.HealthServicer()
    await set_health(health_servicer, health_pb2.HealthCheckResponse.NOT_SERVING)

    server = grpc.aio.server(options=SERVER_OPTIONS)
    inference_pb2_grpc.add_InferenceServicer_to_server(InferenceServicer(state), server)
    worker_pb2_grpc.add_WorkerServicer_to_server(WorkerServicer(state), server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = [inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name,
             worker_pb2.DESCRIPTOR.services_by_name["Worker"].full_name,
             health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME]  # fmt: skip
    reflection.enable_server_reflection(names, server)
    try:
        port = server.add_insecure_port(host_port(options.host, options.port))
    except RuntimeError as e:
        logger.error("Failed to bind address=%s error=%s", host_port(options.host, options.port), e)
        return 1
    address = host_port(options.host, port)
    await server.start()
    metrics_port = metrics.serve(options.host, options.metrics_port) if options.metrics_port else 0
    logger.info(
        "Loading model address=%s worker_id=%s metrics_port=%d", address, options.worker_id, metrics_port
    )

    stop, force = asyncio.Event(), asyncio.Event()

    def on_signal() -> None:  # a second signal skips the grace period
        (force if stop.is_set() else stop).set()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)

    load = asyncio.ensure_future(load_in_thread(engine_factory))
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait({load, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if not load.done():
        logger.info("Stopped before the model loaded")
        load.cancel()
        await server.stop(0)
        metrics.close()
        return 0
    try:
        engine = load.result()
        engine.start()
    except Exception:
        logger.exception("Failed to load the model")
        await server.stop(0)
        metrics.close()
        return 1
    state.engine = engine
    metrics.bind(engine)
    try:
        reporter, reporter_task = await start_reporter(options, engine, port)
    except Exception:
        logger.exception("Failed to start the Redis reporter redis_url=%s", options.redis_url)
        await server.stop(0)
        await engine.shutdown()
        metrics.close()
        return 1
    await set_health(health_servicer, health_pb2.HealthCheckResponse.SERVING)
    logger.info(
        "Worker ready address=%s model=%s max_model_len=%d worker_id=%s metrics_port=%d",
        address, engine.model_name, engine.max_model_len, options.worker_id, metrics_port,
    )  # fmt: skip

    # An engine thread that dies while idle still takes the worker down (and health with it).
    watch = asyncio.ensure_future(engine.wait_failed())
    watch.add_done_callback(lambda t: t.cancelled() or state.engine_failed.set())
    failed = asyncio.ensure_future(state.engine_failed.wait())
    await asyncio.wait({stopping, failed}, return_when=asyncio.FIRST_COMPLETED)
    exit_code = 0
    if not stop.is_set():  # the engine died: stop now, so the orchestrator restarts the worker
        logger.error("Engine stopped unexpectedly; shutting down worker_id=%s", options.worker_id)
        exit_code = 1
        force.set()
    stopping.cancel()
    failed.cancel()
    watch.cancel()
    await drain(options, state, health_servicer, server, reporter, reporter_task, force)
    await engine.shutdown()
    metrics.close()
    logger.info("Worker stopped worker_id=%s exit_code=%d", options.worker_id, exit_code)
    return exit_code


async def start_reporter(options: ServerOptions, engine: AsyncEngine, port: int) -> tuple[Any, Any]:
    if not options.redis_url:
        return None, None
    from kvmesh.worker.reporter import Reporter  # lazy: only workers that report need redis

    advertised = options.advertise_address or default_advertise_address(options.host, port)
    reporter = Reporter(
        engine, options.redis_url, options.deployment, options.worker_id, advertised, engine.model_name
    )
    task = asyncio.ensure_future(reporter.run())
    logger.info("Reporting to Redis deployment=%s advertise_address=%s", options.deployment, advertised)
    return reporter, task


async def drain(
    options: ServerOptions,
    state: WorkerState,
    health_servicer: health.aio.HealthServicer,
    server: grpc.aio.Server,
    reporter: Any,
    reporter_task: Any,
    force: asyncio.Event,
) -> None:
    """Health NOT_SERVING, refuse new work, let in-flight requests finish (abort them after the grace)."""
    state.draining = True
    await health_servicer.enter_graceful_shutdown()
    logger.info("Draining in_flight=%d grace=%.0fs", len(state.in_flight), options.shutdown_grace)
    if reporter is not None:  # deregister first, so gateways stop routing here
        reporter_task.cancel()
        with contextlib.suppress(BaseException):
            await reporter_task
        try:
            await reporter.close()
        except Exception:
            logger.exception("Failed to deregister from Redis")
    idle, forced = asyncio.ensure_future(state.idle.wait()), asyncio.ensure_future(force.wait())
    await asyncio.wait({idle, forced}, timeout=options.shutdown_grace, return_when=asyncio.FIRST_COMPLETED)
    idle.cancel()
    forced.cancel()
    if state.in_flight:
        logger.warning("Aborting unfinished requests in_flight=%d", len(state.in_flight))
        for request_id in list(state.in_flight):
            state.engine.abort(request_id)  # type: ignore[union-attr]
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(state.idle.wait(), 5.0)
    for subscription in list(state.subscriptions):
        with contextlib.suppress(Exception):
            await close_subscription(subscription)
    await server.stop(1.0)
