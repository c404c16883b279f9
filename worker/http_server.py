"""The worker's OpenAI-compatible HTTP front: the shared aiohttp app (kvmesh/openai_http.py) over
the worker's one request path (worker/generation.py), plus ``/metrics`` on the same port, which is
where the Gateway API Inference Extension's endpoint picker scrapes a model server by default.
With TLS it serves HTTPS with the gRPC port's certificate (and its client CA, for mutual TLS);
``/health`` (loaded, engine running) and ``/ready`` (also registered, not draining) then stand in for
the gRPC health probes, which the kubelet cannot make over TLS."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import prometheus_client
from aiohttp import web

from kvmesh.openai_http import OpenAIServer
from kvmesh.tls import ServerTls
from kvmesh.v1 import inference_pb2
from kvmesh.worker import generation

if TYPE_CHECKING:
    from kvmesh.worker.servicers import WorkerState


class WorkerBackend:
    def __init__(self, state: WorkerState) -> None:
        self.state = state

    def generate(
        self, request: inference_pb2.GenerateRequest
    ) -> AsyncIterator[inference_pb2.GenerateResponse]:
        return generation.generate(self.state, request)

    async def models(self) -> list[inference_pb2.ModelInfo]:
        return generation.list_models(self.state)

    async def ready(self) -> bool:
        return self.state.ready and not self.state.draining

    async def alive(self) -> bool:
        # As the gRPC kvmesh.v1.Worker health service: the model is loaded and its engine runs.
        return self.state.engine is not None and not self.state.engine_failed.is_set()


def make_http_server(state: WorkerState, tls: ServerTls | None = None) -> OpenAIServer:
    async def metrics(request: web.Request) -> web.Response:
        body = prometheus_client.generate_latest(state.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": prometheus_client.CONTENT_TYPE_LATEST})

    return OpenAIServer(WorkerBackend(state), extra_routes=[web.get("/metrics", metrics)], tls=tls)
