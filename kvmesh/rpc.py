"""gRPC set-up shared by every kvmesh server (worker and gateway) and client: keepalive settings,
listen addresses, the health service and reflection, so both servers open and close the same way."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from kvmesh.malformed import MalformedRequests
from kvmesh.requests import GRPC_HEADROOM_BYTES, MAX_REQUEST_BYTES
from kvmesh.tls import ServerTls

# Clients (the gateway's worker channels) send keepalive pings every 10 s, idle or not, to notice a
# dead worker quickly. Servers must accept that rate, or they answer GOAWAY "too_many_pings".
KEEPALIVE_TIME_MS = 10_000

SERVER_OPTIONS: list[tuple[str, int]] = [
    ("grpc.so_reuseport", 0),  # a second server on the same port must fail, not share it
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", KEEPALIVE_TIME_MS // 2),
    ("grpc.http2.max_pings_without_data", 0),
]

CHANNEL_OPTIONS: list[tuple[str, int]] = [
    ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.keepalive_permit_without_calls", 1),
]


def host_port(host: str, port: int) -> str:
    """``host:port``, bracketing IPv6 hosts."""
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


class RpcServer:
    """A ``grpc.aio`` server with health (every service NOT_SERVING until ``set_serving``) and
    reflection over the given services. ``register`` adds each servicer to the server."""

    def __init__(
        self,
        services: Sequence[str],
        register: Sequence[Callable[[grpc.aio.Server], None]],
        max_request_bytes: int = MAX_REQUEST_BYTES,
        max_connection_age_s: float = 0.0,
    ) -> None:
        self.services = ("", *services)
        self.health = health.aio.HealthServicer()
        # gRPC refuses larger messages itself (RESOURCE_EXHAUSTED); up to the headroom above the
        # limit the request path answers INVALID_ARGUMENT with the limit in the message.
        receive = ("grpc.max_receive_message_length", max_request_bytes + GRPC_HEADROOM_BYTES)
        self.malformed = MalformedRequests()  # INVALID_ARGUMENT and a rate-limited line, no traceback
        options = [*SERVER_OPTIONS, receive]
        if max_connection_age_s > 0:
            # A GOAWAY after this age (gRPC adds jitter) makes long-lived clients reconnect, and so spread
            # over replicas added since; calls in flight finish on the old connection (no grace limit).
            options.append(("grpc.max_connection_age_ms", int(max_connection_age_s * 1000)))
        self.server = grpc.aio.server(interceptors=[self.malformed], options=options)
        for add in register:
            add(self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        health_name = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
        reflection.enable_server_reflection([*services, health_name, reflection.SERVICE_NAME], self.server)
        self.port = 0
        self.address = ""

    async def start(self, host: str, port: int, tls: ServerTls | None = None) -> str:
        """Binds (raises RuntimeError when the port is taken) and starts; returns ``host:port``.
        With ``tls`` holding a certificate the port serves TLS (mTLS when it names a client CA)."""
        await self.set_serving(False)
        credentials = tls.credentials() if tls is not None else None
        if credentials is not None:
            self.port = self.server.add_secure_port(host_port(host, port), credentials)
        else:
            self.port = self.server.add_insecure_port(host_port(host, port))
        await self.server.start()
        self.address = host_port(host, self.port)
        return self.address

    async def set_serving(self, serving: bool, services: Sequence[str] | None = None) -> None:
        """Sets the health of ``services`` (default: all, the overall "" included)."""
        status = (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for service in self.services if services is None else services:
            await self.health.set(service, status)

    async def stop(self, grace: float | None) -> None:
        """NOT_SERVING for good (watchers see it at once), then the server's own graceful stop."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
