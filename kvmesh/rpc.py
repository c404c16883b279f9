"""gRPC settings shared by every kvmesh server and client."""

from __future__ import annotations

# Clients (the gateway's worker channels) send keepalive pings every 10 s, idle or not, to notice a
# dead worker quickly. Servers must accept that rate, or they answer GOAWAY "too_many_pings".
KEEPALIVE_TIME_MS = 10_000

SERVER_OPTIONS: list[tuple[str, int]] = [
    ("grpc.so_reuseport", 0),  # a second server on the same port must fail, not share it
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", KEEPALIVE_TIME_MS // 2),
    ("grpc.http2.max_pings_without_data", 0),
]
