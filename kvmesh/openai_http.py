"""The OpenAI-compatible HTTP front (aiohttp), shared by worker and gateway.

It only translates: JSON bodies become ``GenerateRequest`` protos (kvmesh/openai_api.py), which go
to the same ``Backend.generate`` the gRPC front calls; the protos that come back become OpenAI
objects or server-sent events (kvmesh/openai_responses.py). It runs in the gRPC server's event loop.

Errors are OpenAI's JSON error object with the matching status, never a stack trace; an error after
a stream started is sent as a last ``data: {"error": ...}`` event before ``data: [DONE]``.

With TLS (``tls``, the gRPC port's certificate) it serves HTTPS only; with a client CA as well, every
path but the probes' (``/health``, ``/ready``) needs a client certificate that CA signed.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

import grpc
from aiohttp import web

from kvmesh.openai_api import ParsedRequest, parse_chat, parse_completion
from kvmesh.openai_responses import ChoiceState, Formatter, error_body, grpc_error
from kvmesh.requests import RequestError, RequestTooLarge
from kvmesh.streams import merge
from kvmesh.tls import ServerTls
from kvmesh.v1 import inference_pb2 as pb

log = logging.getLogger("kvmesh.openai_http")

MAX_BODY_BYTES = 8 * 1024 * 1024
CACHE_SALT_HEADER = "X-Kvmesh-Cache-Salt"
PROBE_PATHS = frozenset({"/health", "/ready"})  # open without a client certificate (kubelet probes)


class Backend(Protocol):
    """What a front needs from the process behind it (the worker's request path or the gateway's
    core). ``generate`` raises ``RequestError`` before its first message when it refuses; the
    iterator may carry ``headers`` (dict) once its first message has arrived."""

    def generate(self, request: pb.GenerateRequest) -> AsyncIterator[pb.GenerateResponse]: ...

    async def models(self) -> list[pb.ModelInfo]: ...

    async def ready(self) -> bool: ...

    async def alive(self) -> bool:
        """``/health``: false once the process can no longer serve (restart it)."""
        ...


def json_response(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status, text=json.dumps(body), content_type="application/json", headers=headers
    )


def error_response(status: int, kind: str, message: str) -> web.Response:
    return json_response(status, error_body(status, kind, message))


@web.middleware
async def openai_errors(request: web.Request, handler: Callable) -> web.StreamResponse:
    """Every failure in OpenAI's error shape: aiohttp's own (404, 405, 413) and unexpected ones."""
    try:
        return await handler(request)
    except RequestTooLarge as e:
        return error_response(413, "invalid_request_error", e.message)
    except RequestError as e:
        status, body = grpc_error(e.code, e.message)
        return json_response(status, body)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        kind = "invalid_request_error" if e.status < 500 else "internal_error"
        return error_response(
            e.status, kind, e.reason if e.status != 413 else "the request body is too large"
        )
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:
        log.exception("HTTP request failed path=%s", request.path)
        return error_response(500, "internal_error", "the server failed to answer this request")


@web.middleware
async def client_certificate(request: web.Request, handler: Callable) -> web.StreamResponse:
    """Mutual TLS: the handshake has checked any certificate presented; this refuses requests that
    presented none, except the probes'."""
    if request.path in PROBE_PATHS or request.transport is None:
        return await handler(request)
    if not request.transport.get_extra_info("peercert"):
        return error_response(401, "authentication_error", "a client certificate is required (mutual TLS)")
    return await handler(request)


class OpenAIServer:
    def __init__(
        self,
        backend: Backend,
        extra_routes: list[web.RouteDef] | None = None,
        shutdown_grace: float = 1.0,
        tls: ServerTls | None = None,
    ) -> None:
        self.backend = backend
        self.shutdown_grace = shutdown_grace  # what in-flight answers get once ``stop`` is called
        self.tls = tls or ServerTls()
        middlewares = [openai_errors]
        if self.tls.requires_client_cert:
            middlewares.append(client_certificate)
        self.app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=middlewares)
        self.app.add_routes(
            [
                web.post("/v1/completions", self.completions),
                web.post("/v1/chat/completions", self.chat_completions),
                web.get("/v1/models", self.list_models),
                web.get("/health", self.health),
                web.get("/ready", self.readiness),
                *(extra_routes or []),
            ]
        )
        self.runner: web.AppRunner | None = None
        self.port = 0
        self.certificate_check_s = 5.0  # how often renewed certificate files are looked for
        self._reloading: asyncio.Task | None = None

    async def start(self, host: str, port: int) -> int:
        # handler_cancellation: a client that hangs up cancels its handler, which aborts the
        # generation (and frees its KV blocks) exactly as a gRPC cancel does.
        self.runner = web.AppRunner(
            self.app,
            access_log=None,
            handle_signals=False,
            shutdown_timeout=self.shutdown_grace,
            handler_cancellation=True,
        )
        # Before setup: an unreadable certificate fails the start, with nothing left listening.
        ssl_context = self.tls.ssl_context()
        await self.runner.setup()
        site = web.TCPSite(self.runner, host, port, reuse_port=False, ssl_context=ssl_context)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        if ssl_context is not None:
            self._reloading = asyncio.ensure_future(self._reload_certificates(ssl_context))
        return self.port

    async def _reload_certificates(self, context) -> None:
        stamps = self.tls.stamps()
        while True:
            await asyncio.sleep(self.certificate_check_s)
            self.tls.reload(context, stamps)

    async def stop(self) -> None:
        if self._reloading is not None:
            self._reloading.cancel()
        if self.runner is not None:
            await self.runner.cleanup()

    # -- routes -----------------------------------------------------------------------------------
    async def health(self, request: web.Request) -> web.Response:
        if await self.backend.alive():
            return json_response(200, {"status": "ok"})
        return error_response(503, "service_unavailable_error", "not serving")

    async def readiness(self, request: web.Request) -> web.Response:
        if await self.backend.ready():
            return json_response(200, {"status": "ready"})
        return error_response(503, "service_unavailable_error", "not ready")

    async def list_models(self, request: web.Request) -> web.Response:
        models = await self.backend.models()
        data = [
            {
                "id": m.id,
                "object": "model",
                "created": 0,
                "owned_by": "kvmesh",
                "max_model_len": m.max_model_len,
            }
            for m in models
        ]
        return json_response(200, {"object": "list", "data": data})

    async def completions(self, request: web.Request) -> web.StreamResponse:
        salt = request.headers.get(CACHE_SALT_HEADER, "")
        return await self.answer(request, parse_completion(await read_json(request), salt))

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        salt = request.headers.get(CACHE_SALT_HEADER, "")
        return await self.answer(request, parse_chat(await read_json(request), salt))

    # -- one answer -------------------------------------------------------------------------------
    async def answer(self, request: web.Request, parsed: ParsedRequest) -> web.StreamResponse:
        model = parsed.model or await self.default_model()
        fmt = Formatter(parsed, model)
        merged = merge({c.index: self.backend.generate(c.request) for c in parsed.choices})
        try:
            return await self._answer(request, parsed, fmt, merged)
        finally:
            await merged.aclose()  # a client gone mid-answer: the generations abort

    async def _answer(self, request, parsed, fmt, merged) -> web.StreamResponse:
        try:
            first = await anext(merged)  # refusals (bad input, no worker, overload) raise here
        except StopAsyncIteration:
            return error_response(500, "internal_error", "the backend returned nothing")
        headers = first[2]
        if parsed.stream:
            return await self.stream(request, parsed, fmt, first, merged, headers)
        states: dict[int, ChoiceState] = {c.index: ChoiceState() for c in parsed.choices}
        item = first
        while True:
            index, response, _ = item
            collect(states[index], response)
            try:
                item = await anext(merged)
            except StopAsyncIteration:
                break
        echo = {c.index: c.prompt_text for c in parsed.choices} if parsed.echo else {}
        return json_response(200, fmt.completion(states, echo), headers)

    async def stream(self, request, parsed, fmt, first, merged, headers) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        response.headers.update(headers or {})
        await response.prepare(request)
        states: dict[int, ChoiceState] = {c.index: ChoiceState() for c in parsed.choices}
        started: set[int] = set()
        echo = {c.index: c.prompt_text for c in parsed.choices} if parsed.echo else {}
        item = first
        try:
            while True:
                index, message, _ = item
                prefix = echo.get(index, "") if index not in started else ""
                offset = len(echo.get(index, "")) + sum(map(len, states[index].text))  # in the whole text
                chunk = fmt.chunk(index, message, index not in started, prefix, offset)
                collect(states[index], message)
                started.add(index)
                await response.write(sse(chunk))
                try:
                    item = await anext(merged)
                except StopAsyncIteration:
                    break
            if parsed.include_usage:
                await response.write(sse(fmt.usage_chunk(states)))
        except RequestError as e:
            await response.write(sse(grpc_error(e.code, e.message)[1]))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async def default_model(self) -> str:
        models = await self.backend.models()
        return models[0].id if models else ""


def sse(body: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(body).encode() + b"\n\n"


def collect(state: ChoiceState, response: pb.GenerateResponse) -> None:
    state.text.append(response.text)
    state.logprobs.extend(response.logprobs)
    if response.finish_reason:
        state.finish_reason = Formatter.finish_reason(response)
        state.usage = response.usage


async def read_json(request: web.Request) -> Any:
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        raise web.HTTPRequestEntityTooLarge(max_size=MAX_BODY_BYTES, actual_size=request.content_length)
    raw = await request.read()
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise RequestError(
            grpc.StatusCode.INVALID_ARGUMENT, f"the request body is not valid JSON: {e}"
        ) from e
