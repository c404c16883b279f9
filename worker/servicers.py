"""The two gRPC services a worker serves over one EngineClient: ``kvmesh.v1.Inference`` (a thin
front over worker/generation.py, the request path the HTTP front shares) and ``kvmesh.v1.Worker``
(load and block events)."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

import grpc

from kvmesh.requests import MAX_REQUEST_BYTES, RequestError
from kvmesh.v1 import inference_pb2, inference_pb2_grpc, worker_pb2, worker_pb2_grpc
from kvmesh.worker import generation
from kvmesh.worker.metrics import WorkerMetrics

if TYPE_CHECKING:
    from kvmesh.worker.engine.client import EngineClient

T = TypeVar("T")
INLINE_BYTES = 8192  # smaller inputs tokenize in well under a millisecond: not worth a thread hop


class WorkerState:
    """What every front shares: the engine once loaded, in-flight requests, drain state."""

    def __init__(self, worker_id: str, metrics: WorkerMetrics) -> None:
        self.worker_id = worker_id
        self.metrics = metrics
        self.engine: EngineClient | None = None
        self.draining = False
        self.ready = False  # loaded (and registered, when reporting to Redis): health is SERVING
        self.engine_failed = asyncio.Event()  # set when the engine dies outside a shutdown
        self.in_flight: set[str] = set()
        self.idle = asyncio.Event()
        self.idle.set()
        self.subscriptions: set[Any] = set()
        self.max_request_bytes = MAX_REQUEST_BYTES
        # One thread owns work that grows with the input (tokenizing, chat templates), so a
        # megabyte prompt never stalls the event loop (health checks, heartbeats, other streams).
        self.input_thread = ThreadPoolExecutor(1, thread_name_prefix="kvmesh-tokenize")

    async def off_loop(self, size: int, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)``, on the input thread when the input is ``INLINE_BYTES`` or larger."""
        if size < INLINE_BYTES:
            return fn(*args)
        return await asyncio.get_running_loop().run_in_executor(self.input_thread, fn, *args)

    async def engine_or_abort(self, context: grpc.aio.ServicerContext) -> EngineClient:
        try:
            return generation.ready_engine(self)
        except RequestError as e:
            await self.reject(context, e)
            raise

    async def reject(self, context: grpc.aio.ServicerContext, error: RequestError) -> None:
        self.metrics.observe_rejected(error.code.name)
        await context.abort(error.code, error.message)

    def begin(self, request_id: str) -> None:
        self.in_flight.add(request_id)
        self.idle.clear()

    def end(self, request_id: str) -> None:
        self.in_flight.discard(request_id)
        if not self.in_flight:
            self.idle.set()


def tokenize_response(ids: list[int]) -> inference_pb2.TokenizeResponse:
    """The response, filled in slices: each slice is one short C call, so while a million ids are
    copied (on the input thread) the event loop still gets the interpreter between slices."""
    response = inference_pb2.TokenizeResponse()
    for start in range(0, len(ids), 32768):
        response.token_ids.extend(ids[start : start + 32768])
    return response


class InferenceServicer(inference_pb2_grpc.InferenceServicer):
    def __init__(self, state: WorkerState) -> None:
        self.state = state

    async def Generate(
        self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[inference_pb2.GenerateResponse]:
        try:
            async for response in generation.generate(self.state, request):
                yield response
        except RequestError as e:  # counted by the request path
            await context.abort(e.code, e.message)

    async def Tokenize(
        self, request: inference_pb2.TokenizeRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.TokenizeResponse:
        try:
            ids = await generation.tokenize(self.state, request)
            return await self.state.off_loop(len(ids) * 4, tokenize_response, ids)
        except RequestError as e:
            await self.state.reject(context, e)
            raise

    async def ListModels(
        self, request: inference_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.ListModelsResponse:
        try:
            return inference_pb2.ListModelsResponse(models=generation.list_models(self.state))
        except RequestError as e:
            await self.state.reject(context, e)
            raise


class WorkerServicer(worker_pb2_grpc.WorkerServicer):
    def __init__(self, state: WorkerState) -> None:
        self.state = state

    def load_message(self, engine: EngineClient) -> worker_pb2.Load:
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
