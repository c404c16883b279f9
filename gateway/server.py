"""The gateway process: the gRPC front (``kvmesh.v1.Inference``) and, with ``http_port``, the
OpenAI HTTP front (gateway/http_server.py), both over one protocol-free core (gateway/core.py) that
tokenizes, routes and forwards to the workers of one or more deployments.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc

from kvmesh.gateway.core import GatewayCore
from kvmesh.gateway.discovery import WorkerWatcher
from kvmesh.gateway.http_server import make_http_server
from kvmesh.gateway.metrics import GatewayMetrics
from kvmesh.gateway.models import ModelDirectory
from kvmesh.gateway.pool import WorkerPool
from kvmesh.gateway.router import Router
from kvmesh.gateway.tenants import Tenant, Tenants, bearer, load_keys
from kvmesh.gateway.tokenizer import LocalTokenizer, WorkerTokenizer
from kvmesh.requests import MAX_REQUEST_BYTES, RequestError
from kvmesh.rpc import RpcServer
from kvmesh.store import InProcessStore, MetadataStore, StoreError
from kvmesh.tls import ClientTls, ServerTls
from kvmesh.v1 import inference_pb2, inference_pb2_grpc

log = logging.getLogger("kvmesh.gateway.server")


@dataclass(slots=True)
class GatewayOptions:
    host: str = "127.0.0.1"
    port: int = 50050
    metrics_port: int = 0
    deployment: str = "default"  # comma-separated: one gateway routes to several deployments
    http_port: int | None = None  # OpenAI-compatible HTTP API; None: off, 0: any free port
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
    max_request_bytes: int = MAX_REQUEST_BYTES  # larger requests: INVALID_ARGUMENT (HTTP 413)
    max_connection_age_s: float = 0.0  # > 0: client connections get a GOAWAY after this long
    api_keys_file: str = ""  # JSON: API key -> tenant, cache salt, limits (gateway/tenants.py)
    tls: ServerTls = field(default_factory=ServerTls)  # clients -> gateway: TLS, mTLS with a client CA
    worker_tls: ClientTls = field(default_factory=ClientTls)  # gateway -> workers


class GatewayServicer(inference_pb2_grpc.InferenceServicer):
    """The gRPC front: translates the core's refusals into statuses and its route into headers."""

    def __init__(self, core: GatewayCore) -> None:
        self.core = core

    async def _tenant(self, context: grpc.aio.ServicerContext) -> Tenant | None:
        """The caller's tenant from its ``authorization`` metadata when API keys are configured."""
        if self.core.tenants is None:
            return None
        try:
            return self.core.tenants.authenticate(
                bearer(dict(context.invocation_metadata()).get("authorization"))
            )
        except RequestError as e:
            await context.abort(e.code, e.message)
            raise

    async def Generate(
        self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[inference_pb2.GenerateResponse]:
        tenant = await self._tenant(context)
        generation = self.core.generate(request, context.time_remaining(), tenant)
        try:
            first = True
            async for response in generation:
                if first:
                    first = False
                    await context.send_initial_metadata(tuple(generation.headers.items()))
                yield response
        except RequestError as e:
            await context.abort(e.code, e.message)
        finally:
            await generation.aclose()  # client cancel or deadline: the worker call is cancelled

    async def Tokenize(
        self, request: inference_pb2.TokenizeRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.TokenizeResponse:
        await self._tenant(context)
        try:
            ids = await self.core.tokenize(request, context.time_remaining())
        except RequestError as e:
            await context.abort(e.code, e.message)
        return inference_pb2.TokenizeResponse(token_ids=ids)

    async def ListModels(
        self, request: inference_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.ListModelsResponse:
        await self._tenant(context)
        models = await self.core.models()
        if not models:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "no worker is registered")
        return inference_pb2.ListModelsResponse(models=models)


class Gateway:
    """Everything one gateway process holds; ``start``/``stop`` without signals, for ``kvmesh up``."""

    def __init__(self, options: GatewayOptions, store: MetadataStore | None = None) -> None:
        self.options = options
        self.metrics = GatewayMetrics()
        deployments = [d.strip() for d in options.deployment.split(",") if d.strip()] or ["default"]
        stores = [store] if store is not None else [_make_store(options, d) for d in deployments]
        if not options.redis_url:
            stores = stores[:1]  # one in-process store holds every watched worker, whatever its model
        self.stores: list[MetadataStore] = stores
        self.pools = [
            WorkerPool(
                s,
                self.metrics,
                max_inflight=options.max_inflight,
                local_load_only=not options.redis_url,
                tls=options.worker_tls,
            )
            for s in stores
        ]
        self.store, self.pool = self.stores[0], self.pools[0]
        self.router = Router(options.policy, load_factor=options.load_factor, key_blocks=options.key_blocks)
        tokenizer = WorkerTokenizer() if options.tokenizer == "worker" else LocalTokenizer(options.tokenizer)
        self.core = GatewayCore(
            ModelDirectory(self.pools), self.router, tokenizer, self.metrics,
            max_attempts=options.max_attempts, max_timeout_s=options.max_timeout_s,
            max_request_bytes=options.max_request_bytes,
        )  # fmt: skip
        if options.api_keys_file:
            self.core.tenants = Tenants(load_keys(options.api_keys_file), options.redis_url, deployments[0])
        self.watcher = (
            WorkerWatcher(self.store, options.workers, tls=options.worker_tls)
            if options.workers and not options.redis_url
            else None
        )
        self.rpc = RpcServer(
            ["kvmesh.v1.Inference"],
            [lambda s: inference_pb2_grpc.add_InferenceServicer_to_server(GatewayServicer(self.core), s)],
            max_request_bytes=options.max_request_bytes,
            max_connection_age_s=options.max_connection_age_s,
        )
        self.http = (
            make_http_server(self.core, options.shutdown_grace, options.tls)
            if options.http_port is not None
            else None
        )
        self.address = ""
        self.http_port = 0
        self.metrics_port = 0

    @property
    def draining(self) -> bool:
        return self.core.draining

    async def start(self) -> str:
        self.address = await self.rpc.start(self.options.host, self.options.port, self.options.tls)
        if self.http is not None:
            self.http_port = await self.http.start(self.options.host, self.options.http_port or 0)
        if self.options.metrics_port:
            self.metrics_port = self.metrics.serve(self.options.host, self.options.metrics_port)
        if self.watcher is not None:
            self.watcher.start()
        await self.rpc.set_serving(True)
        log.info(
            "Gateway serving address=%s http_port=%d policy=%s store=%s deployments=%s metrics_port=%d",
            self.address, self.http_port, self.options.policy,
            "redis" if self.options.redis_url else "in-process", self.options.deployment, self.metrics_port,
        )  # fmt: skip
        return self.address

    async def wait_for_workers(self, n: int, timeout_s: float) -> int:
        deadline = time.monotonic() + timeout_s
        while True:
            count = 0
            for store in self.stores:
                with contextlib.suppress(StoreError):
                    count += len(await store.list_workers())
            if count >= n or time.monotonic() > deadline:
                return count
            await asyncio.sleep(0.1)

    async def stop(self, grace: float | None = None) -> None:
        """Health NOT_SERVING first, refuse new work, let streams finish within the grace period."""
        self.core.draining = True
        fronts = [self.rpc.stop(self.options.shutdown_grace if grace is None else grace)]
        if self.http is not None:
            fronts.append(self.http.stop())  # HTTP answers drain alongside gRPC streams
        await asyncio.gather(*fronts)
        if self.watcher is not None:
            await self.watcher.close()
        for pool in self.pools:
            await pool.close()
        for store in self.stores:
            await store.close()
        if self.core.tenants is not None:
            await self.core.tenants.close()
        self.metrics.close()


def _make_store(options: GatewayOptions, deployment: str) -> MetadataStore:
    if options.redis_url:
        from kvmesh.store.redis_store import RedisStore

        return RedisStore(options.redis_url, deployment)
    return InProcessStore()


async def serve(options: GatewayOptions) -> int:
    """Serves until SIGTERM/SIGINT, then drains; returns the exit code."""
    gateway = Gateway(options)
    try:
        await gateway.start()
    except (RuntimeError, OSError, ValueError) as e:
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
