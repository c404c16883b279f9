"""The gateway's Prometheus metrics, on a registry of its own (several gateways may share a process
in tests and ``kvmesh up``). Named in the workers' style (``kvmesh:`` then the name, as vLLM's
``vllm:``), with ``gateway_`` saying which part reports them."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5)
TOKEN_BUCKETS = (0, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)

if TYPE_CHECKING:
    from kvmesh.v1.inference_pb2 import GenerateResponse


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.decisions = Counter(
            "kvmesh:gateway_routing_decisions", "Routing decisions by policy and outcome",
            ["policy", "outcome"], registry=r,
        )  # fmt: skip
        self.matched_tokens = Histogram(
            "kvmesh:gateway_matched_prefix_tokens", "Prompt tokens the chosen worker was believed to hold",
            buckets=TOKEN_BUCKETS, registry=r,
        )  # fmt: skip
        self.routing_latency = Histogram(
            "kvmesh:gateway_routing_latency_seconds",
            "Hashing, store lookup and choice of a worker (tokenization excluded)",
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.inflight = Gauge(
            "kvmesh:gateway_worker_inflight", "Requests in flight per worker", ["worker"], registry=r
        )
        self.store_errors = Counter(
            "kvmesh:gateway_store_errors", "Metadata store failures by operation", ["op"], registry=r
        )
        self.degraded = Gauge(
            "kvmesh:gateway_store_degraded",
            "1 while routing on local state because the store is down",
            registry=r,
        )
        self.retries = Counter(
            "kvmesh:gateway_retries", "Requests retried on another worker before their first token",
            ["code"], registry=r,
        )  # fmt: skip
        self.requests = Counter(
            "kvmesh:gateway_requests", "Finished requests by gRPC code", ["code"], registry=r
        )
        self.expected_cached = Counter(
            "kvmesh:gateway_expected_cached_tokens", "Prompt tokens the index said the chosen worker held",
            registry=r,
        )  # fmt: skip
        self.actual_cached = Counter(
            "kvmesh:gateway_actual_cached_tokens", "Prompt tokens the workers reused (usage.cached_tokens)",
            registry=r,
        )  # fmt: skip
        self.overestimates = Counter(
            "kvmesh:gateway_prefix_overestimates", "Requests whose worker reused less than predicted",
            registry=r,
        )  # fmt: skip
        self.workers = Gauge("kvmesh:gateway_workers", "Workers in the routing pool", registry=r)
        self._server = None

    def observe_prediction(
        self, matched_tokens: int, prompt_len: int, block_size: int, final: GenerateResponse
    ) -> None:
        """Index accuracy: the prefix the gateway expected on the worker vs what the worker reused
        (capped like the worker, which always computes the last prompt token)."""
        expected = min(matched_tokens, (prompt_len - 1) // block_size * block_size)
        self.expected_cached.inc(expected)
        self.actual_cached.inc(final.usage.cached_tokens)
        if final.usage.cached_tokens < expected:
            self.overestimates.inc()

    def serve(self, host: str, port: int) -> int:
        self._server, _ = start_http_server(port, addr=host, registry=self.registry)
        return self._server.server_port

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None
