"""Prometheus metrics of one worker, named like vLLM's with a ``kvmesh:`` prefix.

Gauges and counters that the engine already keeps (load, token and prefix-cache
counters, preemptions) are read from ``engine.load()`` / ``engine.stats()`` at
scrape time by a collector, so there is one source of truth and no polling task.
Per-request latencies (TTFT, time per output token, end-to-end) and outcomes are
observed by the gRPC server as requests finish; the request phases vLLM reports (queue,
prefill, decode and inference time, inter-token latency, tokens per iteration, prompt and
generation lengths) are observed by the engine itself through ``EngineSink``, from its thread.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any, Protocol

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from kvmesh.worker.engine_metrics import EngineSink

logger = logging.getLogger("kvmesh.worker.metrics")

PREFIX = "kvmesh:"
VLLM_PREFIX = "vllm:"  # names other tools read (worker/metrics.py inference_extension_metrics)
LABELS = ["model_name"]

# Buckets close to vLLM's, covering CPU test runs (slow) through GPU serving (fast).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0)  # fmt: skip
TPOT_BUCKETS = (0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
                0.75, 1.0, 2.5, 5.0)  # fmt: skip
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
               240.0, 480.0, 960.0)  # fmt: skip


class _EngineLike(Protocol):
    model_name: str

    def load(self) -> Any: ...

    def stats(self) -> Any: ...


class EngineCollector(Collector):
    """Reads the engine's load snapshot and cumulative counters at scrape time."""

    def __init__(self) -> None:
        self.engine: _EngineLike | None = None

    def describe(self) -> list[Metric]:
        return []  # unchecked collector: families appear once the model is loaded

    def collect(self) -> Iterator[Metric]:
        engine = self.engine
        if engine is None:
            return
        try:
            load, stats = engine.load(), engine.stats()
        except Exception:  # a scrape must never take the worker down
            logger.exception("Failed to read engine statistics")
            return
        model = [engine.model_name]
        gauges = (
            ("num_requests_running", "Requests in the running batch.", load.running),
            ("num_requests_waiting", "Requests waiting to be scheduled.", load.waiting),
            (
                "kv_cache_usage_perc",
                "Fraction of KV-cache blocks held by live requests (0..1).",
                load.kv_usage,
            ),
            ("num_kv_blocks", "KV-cache blocks in the pool.", load.num_blocks),
        )
        for name, doc, value in gauges:
            family = GaugeMetricFamily(PREFIX + name, doc, labels=LABELS)
            family.add_metric(model, float(value))
            yield family
        counters = (
            ("prompt_tokens", "Prompt tokens admitted.", stats.prompt_tokens),
            ("generation_tokens", "Tokens generated.", stats.generation_tokens),
            (
                "prefix_cache_queries",
                "Prompt tokens looked up in the prefix cache.",
                stats.prefix_cache_queries,
            ),
            ("prefix_cache_hits", "Prompt tokens found in the prefix cache.", stats.prefix_cache_hits),
            ("num_preemptions", "Requests preempted (recomputed) for lack of KV blocks.", stats.preemptions),
        )
        for name, doc, value in counters:
            family = CounterMetricFamily(PREFIX + name, doc, labels=LABELS)
            family.add_metric(model, float(value))
            yield family
        yield from speculative_metrics(engine.model_name, stats)
        yield from inference_extension_metrics(engine.model_name, load)


def speculative_metrics(model_name: str, stats: Any) -> Iterator[Metric]:
    """Speculative decoding, named as vLLM names it: verifications ("drafts"), tokens proposed
    and tokens accepted as counters, and since start the acceptance rate (accepted / proposed)
    and the mean tokens accepted per verification (each verification emits one more token of
    the target's own). Zero counters while speculation is off."""
    drafts, proposed, accepted = (
        getattr(stats, name, 0)
        for name in (
            "spec_decode_num_drafts",
            "spec_decode_num_draft_tokens",
            "spec_decode_num_accepted_tokens",
        )
    )
    for name, doc, value in (
        ("spec_decode_num_drafts", "Verifications of a sequence's speculative proposals.", drafts),
        ("spec_decode_num_draft_tokens", "Speculative tokens proposed.", proposed),
        ("spec_decode_num_accepted_tokens", "Speculative tokens the target model accepted.", accepted),
    ):
        family = CounterMetricFamily(PREFIX + name, doc, labels=LABELS)
        family.add_metric([model_name], float(value))
        yield family
    if not drafts:
        return
    rates = (
        ("spec_decode_draft_acceptance_rate", "Accepted / proposed tokens since start.", accepted / proposed),
        ("spec_decode_mean_accepted_tokens", "Accepted tokens per verification.", accepted / drafts),
    )
    for name, doc, value in rates:
        family = GaugeMetricFamily(PREFIX + name, doc, labels=LABELS)
        family.add_metric([model_name], value)
        yield family


def inference_extension_metrics(model_name: str, load: Any) -> Iterator[Metric]:
    """The names the Gateway API Inference Extension's endpoint picker scrapes (its model-server
    protocol names vLLM's): queue length, running requests, KV-cache utilization (under both the
    current and the older vLLM name), cache geometry and LoRA state (none served: empty lists)."""
    for name, doc, value in (
        ("num_requests_waiting", "Requests waiting to be scheduled (TotalQueuedRequests).", load.waiting),
        ("num_requests_running", "Requests in the running batch (TotalRunningRequests).", load.running),
        ("kv_cache_usage_perc", "KV-cache utilization, 0..1 (KVCacheUtilization).", load.kv_usage),
        ("gpu_cache_usage_perc", "KV-cache utilization, 0..1 (older vLLM name).", load.kv_usage),
    ):
        family = GaugeMetricFamily(VLLM_PREFIX + name, doc, labels=LABELS)
        family.add_metric([model_name], float(value))
        yield family
    info = GaugeMetricFamily(
        VLLM_PREFIX + "cache_config_info", "KV-cache geometry (BlockSize, NumGPUBlocks).",
        labels=["block_size", "num_gpu_blocks"],
    )  # fmt: skip
    info.add_metric([str(load.block_size), str(load.num_blocks)], 1.0)
    yield info
    lora = GaugeMetricFamily(
        VLLM_PREFIX + "lora_requests_info", "LoRA adapters running and waiting (none: kvmesh serves none).",
        labels=["max_lora", "running_lora_adapters", "waiting_lora_adapters"],
    )  # fmt: skip
    lora.add_metric(["0", "", ""], time.time())
    yield lora


class WorkerMetrics:
    """The worker's registry; the server calls ``observe_*`` as requests progress."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.model_name = ""
        self._engine_collector = EngineCollector()
        self.registry.register(self._engine_collector)
        self.ttft = Histogram(
            PREFIX + "time_to_first_token_seconds",
            "Time from request arrival to its first generated token.",
            LABELS,
            buckets=TTFT_BUCKETS,
            registry=self.registry,
        )
        self.tpot = Histogram(
            PREFIX + "time_per_output_token_seconds",
            "Mean time per output token after the first, per request.",
            LABELS,
            buckets=TPOT_BUCKETS,
            registry=self.registry,
        )
        self.e2e = Histogram(
            PREFIX + "e2e_request_latency_seconds",
            "Time from request arrival to its last token.",
            LABELS,
            buckets=E2E_BUCKETS,
            registry=self.registry,
        )
        self.success = Counter(
            PREFIX + "request_success",
            "Requests finished, by finish reason (stop, length, abort).",
            [*LABELS, "finished_reason"],
            registry=self.registry,
        )
        self.rejected = Counter(
            PREFIX + "request_rejected",
            "Requests answered with an error status, by gRPC code.",
            [*LABELS, "code"],
            registry=self.registry,
        )
        self.cancelled = Counter(
            PREFIX + "request_cancelled",
            "Requests cancelled by the client or by their deadline.",
            LABELS,
            registry=self.registry,
        )
        self.engine_sink = EngineSink(self.registry)
        self._httpd: Any = None

    def bind(self, engine: _EngineLike) -> None:
        """Starts reporting the engine's gauges and counters (once its model is loaded)."""
        self.model_name = engine.model_name
        self._engine_collector.engine = engine
        core = getattr(engine, "engine", engine)  # the offline LLM wraps the LLMEngine that steps
        if hasattr(core, "metrics_sink"):
            self.engine_sink.model_name = engine.model_name
            core.metrics_sink = self.engine_sink

    def observe_first_token(self, ttft: float) -> None:
        self.ttft.labels(self.model_name).observe(ttft)

    def observe_finished(
        self, finish_reason: str, ttft: float | None, e2e: float, completion_tokens: int
    ) -> None:
        self.success.labels(self.model_name, finish_reason).inc()
        self.e2e.labels(self.model_name).observe(e2e)
        if ttft is not None and completion_tokens > 1:
            self.tpot.labels(self.model_name).observe((e2e - ttft) / (completion_tokens - 1))

    def observe_rejected(self, code: str) -> None:
        self.rejected.labels(self.model_name, code).inc()

    def observe_cancelled(self) -> None:
        self.cancelled.labels(self.model_name).inc()

    def serve(self, host: str, port: int) -> int:
        """Exposes /metrics over HTTP in a background thread; returns the bound port."""
        prometheus_client.disable_created_metrics()
        self._httpd, _ = prometheus_client.start_http_server(port, addr=host, registry=self.registry)
        return int(self._httpd.server_port)

    def close(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
