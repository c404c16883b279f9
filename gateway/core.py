"""The gateway's protocol-free core: one routing-and-forwarding path that the gRPC front
(gateway/server.py) and the OpenAI HTTP front (gateway/http_server.py) both call.

A request's path, one step per function: the deadline (``Deadline``), the model (``ModelDirectory``),
token ids (``tokenizer``), the prompt's block hashes (``kvmesh.prefix``), a worker (``_pick``: one
store read, the router's choice), the forwarded stream (``_forward``). A worker that fails (gone,
full, draining) is replaced by another: before the first response by a retry, after it by a
continuation from the tokens already sent (gateway/failover.py); other statuses reach the client.
The deadline (clamped) travels to the worker, and closing the stream cancels the worker's call, which
aborts the sequence there. Refusals are ``RequestError``; each front renders them its own way.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator

import grpc

from kvmesh.gateway.failover import Progress
from kvmesh.gateway.metrics import GatewayMetrics
from kvmesh.gateway.models import ModelDirectory, ModelTarget
from kvmesh.gateway.pool import WorkerConn
from kvmesh.gateway.route import Deadline, Route
from kvmesh.gateway.router import Decision, Router
from kvmesh.gateway.tenants import Tenant, Tenants
from kvmesh.gateway.tokenizer import LocalTokenizer, WorkerTokenizer
from kvmesh.prefix import block_hashes
from kvmesh.requests import MAX_REQUEST_BYTES, RequestError, check_sampling, check_size
from kvmesh.v1 import inference_pb2

log = logging.getLogger("kvmesh.gateway.core")

# Worth another worker when nothing was streamed yet: the worker is gone, full or draining.
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNKNOWN}


class Generation:
    """One forwarded generation: an async iterator of ``GenerateResponse``; ``route`` and
    ``headers`` are set once the first response has arrived. Closing it cancels the worker call."""

    def __init__(
        self,
        core: GatewayCore,
        request: inference_pb2.GenerateRequest,
        deadline: Deadline,
        tenant: Tenant | None,
    ) -> None:
        self.route: Route | None = None
        self.headers: dict[str, str] = {}
        self._stream = core._run(self, request, deadline, tenant)

    def __aiter__(self) -> Generation:
        return self

    async def __anext__(self) -> inference_pb2.GenerateResponse:
        return await anext(self._stream)

    async def aclose(self) -> None:
        await self._stream.aclose()


class GatewayCore:
    def __init__(
        self,
        directory: ModelDirectory,
        router: Router,
        tokenizer: WorkerTokenizer | LocalTokenizer,
        metrics: GatewayMetrics,
        max_attempts: int = 3,
        max_timeout_s: float = 600.0,
        max_request_bytes: int = MAX_REQUEST_BYTES,
    ) -> None:
        self.directory = directory
        self.router = router
        self.tokenizer = tokenizer
        self.metrics = metrics
        self.max_attempts = max_attempts
        self.max_timeout_s = max_timeout_s
        self.max_request_bytes = max_request_bytes
        self.tenants: Tenants | None = None  # API keys and their limits (--api-keys-file)
        self.draining = False
        self._model_infos: dict[str, tuple[float, inference_pb2.ModelInfo]] = {}

    def generate(
        self,
        request: inference_pb2.GenerateRequest,
        timeout_s: float | None = None,
        tenant: Tenant | None = None,
    ) -> Generation:
        return Generation(self, request, Deadline(timeout_s, self.max_timeout_s), tenant)

    async def _run(
        self,
        generation: Generation,
        request: inference_pb2.GenerateRequest,
        deadline: Deadline,
        tenant: Tenant | None,
    ) -> AsyncIterator[inference_pb2.GenerateResponse]:
        try:
            if self.draining:
                raise RequestError(grpc.StatusCode.UNAVAILABLE, "the gateway is draining")
            check_size(request, self.max_request_bytes)
            check_sampling(request.sampling)
            if tenant is not None and self.tenants is not None:
                await self.tenants.admit(tenant)
            target = await self.directory.resolve(request.model)
            ids = await self.tokenizer.encode(request, target, timeout_s=deadline.budget)
            forward = inference_pb2.GenerateRequest()
            forward.CopyFrom(request)
            forward.model = target.name
            forward.token_ids.ids[:] = ids  # the oneof now carries token ids: workers never re-tokenize
            forward.request_id = request.request_id or uuid.uuid4().hex
            if tenant is not None:  # the tenant's prefix cache, whatever the request says
                forward.cache_salt = tenant.cache_salt
            async for response in self._forward(generation, forward, target, deadline):
                if response.finish_reason and tenant is not None and self.tenants is not None:
                    await self.tenants.spend(
                        tenant, response.usage.prompt_tokens + response.usage.completion_tokens
                    )
                yield response
        except RequestError as e:
            self.metrics.requests.labels(e.code.name).inc()
            raise
        self.metrics.requests.labels("OK").inc()

    async def _forward(
        self,
        generation: Generation,
        forward: inference_pb2.GenerateRequest,
        target: ModelTarget,
        deadline: Deadline,
    ) -> AsyncIterator[inference_pb2.GenerateResponse]:
        bs = target.block_size
        progress = Progress(forward)
        excluded: set[str] = set()
        last_error = "no worker is available"
        for attempt in range(1, self.max_attempts + 1):
            t0 = time.perf_counter()
            request = progress.request()  # after tokens were sent: prompt + those tokens
            hashes = block_hashes(request.token_ids.ids, bs, model=target.name, cache_salt=request.cache_salt)
            conn, decision = await self._pick(target, hashes, excluded, last_error)
            route_s = time.perf_counter() - t0
            self.metrics.routing_latency.observe(route_s)
            matched_tokens = decision.matched_blocks * bs
            self.metrics.matched_tokens.observe(matched_tokens)
            target.pool.record_route(conn.worker_id, hashes)
            timeout = deadline.left()
            if timeout <= 0:
                raise RequestError(grpc.StatusCode.DEADLINE_EXCEEDED, "the deadline passed before routing")
            route = Route(conn.worker_id, int(route_s * 1e6), matched_tokens, decision.outcome.value, attempt)
            target.pool.begin(conn)
            call = conn.stub.Generate(request, timeout=timeout)
            try:
                async for response in call:
                    if generation.route is None:
                        generation.route, generation.headers = route, route.headers()
                    if response.finish_reason:
                        self.metrics.observe_prediction(
                            matched_tokens, len(request.token_ids.ids), bs, response
                        )
                    yield progress.observe(response)
                return
            except grpc.aio.AioRpcError as e:
                code = e.code()
                if code not in RETRYABLE:
                    raise RequestError(code, e.details() or code.name) from e
                last_error = f"worker {conn.worker_id} failed: {code.name} {e.details()}"
                if progress.sent and progress.remaining <= 0:  # only the final message was lost
                    yield progress.finished(conn.worker_id)
                    return
                log.warning("%s request_id=%s on another worker after %d tokens: %s",
                            "Continuing" if progress.sent else "Retrying", forward.request_id,
                            len(progress.sent), last_error)  # fmt: skip
                self.metrics.retries.labels(code.name).inc()
                if code != grpc.StatusCode.RESOURCE_EXHAUSTED:
                    target.pool.mark_down(conn)
                excluded.add(conn.worker_id)
            finally:
                target.pool.end(conn)
                if not call.done():
                    call.cancel()  # client cancel or deadline: the worker aborts the sequence
        raise RequestError(grpc.StatusCode.UNAVAILABLE, last_error)

    async def _pick(
        self, target: ModelTarget, hashes: list[int], excluded: set[str], last_error: str
    ) -> tuple[WorkerConn, Decision]:
        """One store read, then the router's choice among the model's workers."""
        view = await target.pool.view(hashes)
        candidates = target.pool.candidates(view, excluded, target.name)
        decision = self.router.choose(candidates, hashes)
        self.metrics.decisions.labels(self.router.policy, decision.outcome.value).inc()
        if decision.worker_id is None:
            if candidates:
                raise RequestError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED, "every worker is at its in-flight limit"
                )
            raise RequestError(grpc.StatusCode.UNAVAILABLE, last_error)
        return target.pool.conns[decision.worker_id], decision

    # -- unary calls ------------------------------------------------------------------------------
    async def tokenize(self, request: inference_pb2.TokenizeRequest, timeout_s: float | None) -> list[int]:
        check_size(request, self.max_request_bytes)
        target = await self.directory.resolve(request.model)
        forward = inference_pb2.TokenizeRequest()
        forward.CopyFrom(request)
        forward.model = target.name
        response = await self._unary(target, lambda stub, t: stub.Tokenize(forward, timeout=t), timeout_s)
        return list(response.token_ids)

    async def models(self) -> list[inference_pb2.ModelInfo]:
        """Every served model; a worker of each fills in its context length (cached for 30 s)."""
        out = []
        for info in await self.directory.list():
            cached = self._model_infos.get(info.id)
            if cached is None or time.monotonic() - cached[0] > 30.0:
                target = await self.directory.resolve(info.id)
                try:
                    listed = await self._unary(
                        target,
                        lambda stub, t: stub.ListModels(inference_pb2.ListModelsRequest(), timeout=t),
                        5.0,
                    )
                    full = next((m for m in listed.models if m.id == info.id), info)
                except RequestError:
                    full = info
                cached = (time.monotonic(), full)
                self._model_infos[info.id] = cached
            out.append(cached[1])
        return out

    async def _unary(self, target: ModelTarget, call, timeout_s: float | None):
        timeout = 10.0 if timeout_s is None else min(timeout_s, 10.0)
        tried: set[str] = set()
        while True:
            conn = await target.pool.any_conn(tried, target.name)
            if conn is None:
                raise RequestError(grpc.StatusCode.UNAVAILABLE, "no worker is available")
            try:
                return await call(conn.stub, timeout)
            except grpc.aio.AioRpcError as e:
                if e.code() != grpc.StatusCode.UNAVAILABLE or len(tried) >= 2:
                    raise RequestError(e.code(), e.details() or e.code().name) from e
                target.pool.mark_down(conn)
                tried.add(conn.worker_id)
