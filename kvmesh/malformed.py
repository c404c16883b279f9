"""Undecodable requests (invalid UTF-8 in a string field, truncated or garbage bytes) answered with
INVALID_ARGUMENT and at most one log line per ``every_s``, on every kvmesh gRPC server.

Left to grpc, such a request fails inside its deserializer: the client gets UNKNOWN and the server
log a full traceback, per request, which makes flooding the log cheap. This interceptor decodes with
a tolerant deserializer and lets the handler refuse the request before it runs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import grpc

log = logging.getLogger("kvmesh.rpc")


class Malformed:
    """What the tolerant deserializer hands the handler instead of a message."""

    __slots__ = ("error",)

    def __init__(self, error: str) -> None:
        self.error = error


def tolerant(decode: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def deserialize(raw: bytes) -> Any:
        try:
            return decode(raw)
        except Exception as e:  # DecodeError and whatever a deserializer raises on garbage
            return Malformed(str(e) or type(e).__name__)

    return deserialize


class MalformedRequests(grpc.aio.ServerInterceptor):
    def __init__(self, every_s: float = 10.0) -> None:
        self.every_s = every_s
        self.suppressed = 0
        self._logged_at = -float("inf")

    def refused(self, method: str, error: str) -> None:
        """One warning now, then none until ``every_s`` has passed (that one counts the rest)."""
        now = time.monotonic()
        if now - self._logged_at < self.every_s:
            self.suppressed += 1
            return
        extra = f" (and {self.suppressed} more since the last report)" if self.suppressed else ""
        log.warning("Refused a malformed request method=%s error=%s%s", method, error, extra)
        self._logged_at, self.suppressed = now, 0

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None or handler.request_streaming or handler.request_deserializer is None:
            return handler
        method = details.method
        if handler.unary_unary is not None:
            behavior = handler.unary_unary

            async def unary(request, context):
                if isinstance(request, Malformed):
                    await self._abort(context, method, request)
                return await behavior(request, context)

            return handler._replace(
                request_deserializer=tolerant(handler.request_deserializer), unary_unary=unary
            )
        if handler.unary_stream is not None:
            streaming = handler.unary_stream

            async def stream(request, context):
                if isinstance(request, Malformed):
                    await self._abort(context, method, request)
                async for response in streaming(request, context):
                    yield response

            return handler._replace(
                request_deserializer=tolerant(handler.request_deserializer), unary_stream=stream
            )
        return handler

    async def _abort(self, context: grpc.aio.ServicerContext, method: str, request: Malformed) -> None:
        self.refused(method, request.error)
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed request: {request.error}")
