"""The gateway's gRPC server: ``kvmesh.v1.Inference`` in front of a pool of workers.

A request's path: tokenize once (``tokenizer``), hash the prompt's blocks (``kvmesh.prefix``),
read the store once (``pool.view``), choose a worker (``router``), forward the token ids and pass
the stream through. A failure before the first response is retried on another worker; after it,
the worker's status reaches the client unchanged. The client's deadline (clamped) travels to the
worker, and a client cancel cancels the worker's call, which aborts the sequence there.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from kvmesh.gateway.discovery import WorkerWatcher
from kvmesh.gateway.metrics import GatewayMetrics
from kvmesh.gateway.pool import WorkerPool
from kvmesh.gateway.router import Router
from kvmesh.gateway.tokenizer import InvalidPrompt, LocalTokenizer, WorkerTokenizer
from kvmesh.prefix import block_hashes
from kvmesh.rpc import SERVER_OPTIONS
from kvmesh.store import InProcessStore, MetadataStore, StoreError
from kvmesh.v1 import inference_pb2, inference_pb2_grpc

log = logging.getLogger("kvmesh.gateway.server")

SERVICES = ("", "kvmesh.v1.Inference")
# Worth another worker when nothing was streamed yet: the worker is gone, full or draining.
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNKNOWN}


@dataclass(slots=True)
class GatewayOptions:
    host: str = "127.0.0.1"
    port: int = 50050
    metrics_port: int = 0
    deployment: str = "default"
    redis_url: str = ""  # empty: in-process store fed from `workers`
    workers: list[str] = field(default_factory=list)  # static worker addresses (in-process store)
    tokenizer: str = "worker"  # "worker", "default" or a model path
    policy: str = "prefix"
    load_factor: float = 1.25
    key_blocks: int = 4
    max_inflight: int = 64  # per worker; RESOURCE_EXHAUSTED when every worker is at it
    max_attempts: int = 3
    max_timeout_s: float = 600.0  # clamps client deadlines (and bounds deadline-less calls)
    shutdown_grace: float = 25.0


class GatewayServicer(inference_pb2_grpc.InferenceServicer):
    def __init__(self, gateway: Gateway) -> None:
        self.gw = gateway

    async def Generate(
        self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[inference_pb2.GenerateResponse]:
        gw = self.gw
        if gw.draining:
            await gw.abort(context, grpc.StatusCode.UNAVAILABLE, "the gateway is draining")
        remaining = context.time_remaining()
        budget = gw.options.max_timeout_s if remaining is None else min(remaining, gw.options.max_timeout_s)
        deadline = time.monotonic() + budget
        try:
            ids = await gw.tokenizer.encode(request, timeout_s=budget)
        except InvalidPrompt as e:
            await gw.abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except ConnectionError as e:
            await gw.abort(context, grpc.StatusCode.UNAVAILABLE, str(e))
        model, block_size = await gw.model_info()
        if not model:
            await gw.abort(context, grpc.StatusCode.UNAVAILABLE, "no worker is registered")

        forward = inference_pb2.GenerateRequest()
        forward.CopyFrom(request)
        forward.token_ids.ids[:] = ids  # the oneof now carries token ids: workers never re-tokenize
        forward.request_id = request.request_id or uuid.uuid4().hex

        t0 = time.perf_counter()
        hashes = block_hashes(ids, block_size, model=model, cache_salt=request.cache_salt)
        hash_s = time.perf_counter() - t0
        excluded: set[str] = set()
        last_error = "no worker is available"
        for attempt in range(1, gw.options.max_attempts + 1):
            t1 = time.perf_counter()
            view = await gw.pool.view(hashes)
            candidates = gw.pool.candidates(view, excluded)
            decision = gw.router.choose(candidates, hashes)
            route_s = hash_s + time.perf_counter() - t1
            gw.metrics.routing_latency.observe(route_s)
            gw.metrics.decisions.labels(gw.router.policy, decision.outcome.value).inc()
            if decision.worker_id is None:
                if candidates:
                    await gw.abort(
                        context, grpc.StatusCode.RESOURCE_EXHAUSTED, "every worker is at its in-flight limit"
                    )
                await gw.abort(context, grpc.StatusCode.UNAVAILABLE, last_error)
            matched_tokens = decision.matched_blocks * block_size
            gw.metrics.matched_tokens.observe(matched_tokens)
            conn = gw.pool.conns[decision.worker_id]
            gw.pool.record_route(conn.worker_id, hashes)
            timeout = deadline - time.monotonic()
            if timeout <= 0:
                await gw.abort(
                    context, grpc.StatusCode.DEADLINE_EXCEEDED, "the deadline passed before routing"
                )
            gw.pool.begin(conn)
            call = conn.stub.Generate(forward, timeout=timeout)
            streamed = False
            try:
                async for response in call:
                    if not streamed:
                        streamed = True
                        await context.send_initial_metadata(
                            (
                                ("kvmesh-worker", conn.worker_id),
                                ("kvmesh-route-us", str(int(route_s * 1e6))),
                                ("kvmesh-matched-tokens", str(matched_tokens)),
                                ("kvmesh-route-outcome", decision.outcome.value),
                                ("kvmesh-attempts", str(attempt)),
                            )
                        )
                    if response.usage.prompt_tokens:  # the final message
                        gw.observe_prediction(
                            matched_tokens, len(ids), block_size, response.usage.cached_tokens
                        )
                    yield response
                gw.metrics.requests.labels("OK").inc()
                return
            except grpc.aio.AioRpcError as e:
                code = e.code()
                if streamed or code not in RETRYABLE:
                    await gw.abort(context, code, e.details() or code.name)
                last_error = f"worker {conn.worker_id} failed: {code.name} {e.details()}"
                log.info("Retrying on another worker request_id=%s %s", forward.request_id, last_error)
                gw.metrics.retries.labels(code.name).inc()
                if code != grpc.StatusCode.RESOURCE_EXHAUSTED:
                    gw.pool.mark_down(conn)
                excluded.add(conn.worker_id)
            finally:
                gw.pool.end(conn)
                if not call.done():
                    call.cancel()  # client cancel or deadline: the worker aborts the sequence
        await gw.abort(context, grpc.StatusCode.UNAVAILABLE, last_error)

    async def Tokenize(
        self, request: inference_pb2.TokenizeRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.TokenizeResponse:
        return await self._forward_unary(context, lambda stub, t: stub.Tokenize(request, timeout=t))

    async def ListModels(
        self, request: inference_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.ListModelsResponse:
        return await self._forward_unary(context, lambda stub, t: stub.ListModels(request, timeout=t))

    async def _forward_unary(self, context: grpc.aio.ServicerContext, call):
        remaining = context.time_remaining()
        timeout = 10.0 if remaining is None else min(remaining, 10.0)
        tried: set[str] = set()
        while True:
            conn = await self.gw.pool.any_conn(tried)
            if conn is None:
                await self.gw.abort(context, grpc.StatusCode.UNAVAILABLE, "no worker is available")
            try:
                return await call(conn.stub, timeout)
            except grpc.aio.AioRpcError as e:
                if e.code() != grpc.StatusCode.UNAVAILABLE or len(tried) >= 2:
                    await self.gw.abort(context, e.code(), e.details() or e.code().name)
                self.gw.pool.mark_down(conn)
                tried.add(conn.worker_id)


class Gateway:
    """Everything one gateway process holds; ``start``/``stop`` without signals, for ``kvmesh up``."""

    def __init__(self, options: GatewayOptions, store: MetadataStore | None = None) -> None:
        self.options = options
        self.metrics = GatewayMetrics()
        if store is None:
            store = _make_store(options)
        self.store = store
        self.pool = WorkerPool(
            store, self.metrics, max_inflight=options.max_inflight, local_load_only=not options.redis_url
        )
        self.router = Router(options.policy, load_factor=options.load_factor, key_blocks=options.key_blocks)
        if options.tokenizer == "worker":
            self.tokenizer: WorkerTokenizer | LocalTokenizer = WorkerTokenizer(self.pool)
        else:
            self.tokenizer = LocalTokenizer(options.tokenizer)
        self.watcher = (
            WorkerWatcher(store, options.workers) if options.workers and not options.redis_url else None
        )
        self.health = health.aio.HealthServicer()
        self.server: grpc.aio.Server | None = None
        self.address = ""
        self.metrics_port = 0
        self.draining = False

    async def abort(self, context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str) -> None:
        self.metrics.requests.labels(code.name).inc()
        await context.abort(code, message)

    def observe_prediction(self, matched_tokens: int, prompt_len: int, block_size: int, cached: int) -> None:
        """Index accuracy: the prefix the gateway expected on the worker vs what the worker reused
        (capped like the worker, which always computes the last prompt token)."""
        expected = min(matched_tokens, (prompt_len - 1) // block_size * block_size)
        self.metrics.expected_cached.inc(expected)
        self.metrics.actual_cached.inc(cached)
        if cached < expected:
            self.metrics.overestimates.inc()

    async def model_info(self) -> tuple[str, int]:
        """(served model name, block size) of the deployment, from the registry."""
        workers = self.pool.known
        if not workers:
            try:
                workers = await self.store.list_workers()
            except StoreError:
                workers = []
        if not workers:
            return "", 0
        return workers[0].model, workers[0].block_size

    async def start(self) -> str:
        for service in SERVICES:
            await self.health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        server = grpc.aio.server(options=SERVER_OPTIONS)
        inference_pb2_grpc.add_InferenceServicer_to_server(GatewayServicer(self), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        names = [
            inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ]
        reflection.enable_server_reflection(names, server)
        host = self.options.host
        bind = f"[{host}]:{self.options.port}" if ":" in host else f"{host}:{self.options.port}"
        port = server.add_insecure_port(bind)
        await server.start()
        self.server = server
        self.address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        if self.options.metrics_port:
            self.metrics_port = self.metrics.serve(host, self.options.metrics_port)
        if self.watcher is not None:
            self.watcher.start()
        for service in SERVICES:
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "Gateway serving address=%s policy=%s store=%s metrics_port=%d",
            self.address, self.options.policy, "redis" if self.options.redis_url else "in-process",
            self.metrics_port,
        )  # fmt: skip
        return self.address

    async def wait_for_workers(self, n: int, timeout_s: float) -> int:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                count = len(await self.store.list_workers())
            except StoreError:
                count = 0
            if count >= n or time.monotonic() > deadline:
                return count
            await asyncio.sleep(0.1)

    async def stop(self, grace: float | None = None) -> None:
        """Health NOT_SERVING first, refuse new work, let streams finish within the grace period."""
        self.draining = True
        for service in SERVICES:
            await self.health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        if self.server is not None:
            await self.server.stop(self.options.shutdown_grace if grace is None else grace)
        if self.watcher is not None:
            await self.watcher.close()
        await self.pool.close()
        await self.store.close()
        self.metrics.close()


def _make_store(options: GatewayOptions) -> MetadataStore:
    if options.redis_url:
        from kvmesh.store.redis_store import RedisStore

        return RedisStore(options.redis_url, options.deployment)
    return InProcessStore()


async def serve(options: GatewayOptions) -> int:
    """Serves until SIGTERM/SIGINT, then drains; returns the exit code."""
    gateway = Gateway(options)
    try:
        await gateway.start()
    except RuntimeError as e:
        log.error("Failed to start the gateway error=%s", e)
        return 1
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("Draining gateway grace=%.1fs", options.shutdown_grace)
    await gateway.stop()
    return 0
