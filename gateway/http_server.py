"""The gateway's OpenAI-compatible HTTP front: the shared aiohttp app (kvmesh/openai_http.py) over
the same protocol-free core the gRPC front calls (gateway/core.py). Route facts (worker, matched
tokens, attempts) come back as ``kvmesh-*`` response headers, as gRPC sends them as metadata.
With TLS it serves HTTPS with the gRPC port's certificate (and its client CA, for mutual TLS)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextvars import ContextVar
from typing import TYPE_CHECKING

from aiohttp import web

from kvmesh.gateway.tenants import Tenant, bearer
from kvmesh.openai_http import OpenAIServer, error_response
from kvmesh.requests import RequestError
from kvmesh.tls import ServerTls
from kvmesh.v1 import inference_pb2

if TYPE_CHECKING:
    from kvmesh.gateway.core import GatewayCore

TENANT: ContextVar[Tenant | None] = ContextVar("kvmesh_tenant", default=None)


class GatewayBackend:
    def __init__(self, core: GatewayCore) -> None:
        self.core = core

    def generate(
        self, request: inference_pb2.GenerateRequest
    ) -> AsyncIterator[inference_pb2.GenerateResponse]:
        # No client deadline over HTTP: the gateway's maximum. The tenant: set by ``authenticate``.
        return self.core.generate(request, tenant=TENANT.get())

    async def models(self) -> list[inference_pb2.ModelInfo]:
        return await self.core.models()

    async def ready(self) -> bool:
        return not self.core.draining and bool(await self.core.directory.refresh())

    async def alive(self) -> bool:
        return True  # answering at all is the gateway's liveness; it has no engine to lose


def make_http_server(core: GatewayCore, shutdown_grace: float, tls: ServerTls | None = None) -> OpenAIServer:
    server = OpenAIServer(GatewayBackend(core), shutdown_grace=shutdown_grace, tls=tls)

    @web.middleware
    async def authenticate(request: web.Request, handler):
        """With API keys configured, /v1/* needs ``Authorization: Bearer <key>`` (401 without)."""
        if core.tenants is None or not request.path.startswith("/v1/"):
            return await handler(request)
        try:
            tenant = core.tenants.authenticate(bearer(request.headers.get("Authorization")))
        except RequestError as e:
            return error_response(401, "authentication_error", e.message)
        TENANT.set(tenant)  # this handler's task only
        return await handler(request)

    server.app.middlewares.append(authenticate)  # inside openai_errors, which renders 429s
    return server
