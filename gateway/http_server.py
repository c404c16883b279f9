"""The gateway's OpenAI-compatible HTTP front: the shared aiohttp app (kvmesh/openai_http.py) over
the same protocol-free core the gRPC front calls (gateway/core.py). Route facts (worker, matched
tokens, attempts) come back as ``kvmesh-*`` response headers, as gRPC sends them as metadata."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from kvmesh.openai_http import OpenAIServer
from kvmesh.v1 import inference_pb2

if TYPE_CHECKING:
    from kvmesh.gateway.core import GatewayCore


class GatewayBackend:
    def __init__(self, core: GatewayCore) -> None:
        self.core = core

    def generate(
        self, request: inference_pb2.GenerateRequest
    ) -> AsyncIterator[inference_pb2.GenerateResponse]:
        return self.core.generate(request)  # no client deadline over HTTP: the gateway's maximum

    async def models(self) -> list[inference_pb2.ModelInfo]:
        return await self.core.models()

    async def ready(self) -> bool:
        return not self.core.draining and bool(await self.core.directory.refresh())


def make_http_server(core: GatewayCore, shutdown_grace: float) -> OpenAIServer:
    return OpenAIServer(GatewayBackend(core), shutdown_grace=shutdown_grace)
