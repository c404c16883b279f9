"""Metrics a vLLM user looks for, from a real worker behind a real gateway, in one naming style;
and the chart's Grafana dashboard queries only names these processes really export."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import urllib.request
from pathlib import Path

import grpc
import pytest
from worker_fixtures import scrape

from kvmesh.client import build_request, generate
from kvmesh.gateway.server import Gateway, GatewayOptions

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy/helm/kvmesh/dashboards/kvmesh.json"
SUFFIXES = {"histogram": ["_bucket", "_sum", "_count"]}  # counters' TYPE lines already say _total


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def exposition(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return response.read().decode()


def exported_names(text: str) -> set[str]:
    """Every sample name a scrape can hold, from its ``# TYPE`` lines (labelled metrics that
    have not been observed yet still declare their family)."""
    names = set()
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M):
        names.update(name + suffix for suffix in SUFFIXES.get(kind, [""]))
    return names


def dashboard_names() -> set[str]:
    exprs = [t["expr"] for p in json.loads(DASHBOARD.read_text())["panels"] for t in p.get("targets", [])]
    exprs.append(json.loads(DASHBOARD.read_text())["templating"]["list"][1]["query"]["query"])
    return {m for e in exprs for m in re.findall(r"\b(?:kvmesh|vllm):[A-Za-z0-9_:]+", e)}


@pytest.fixture(scope="module")
def scrapes(worker_launcher):
    worker = worker_launcher.start("metrics", extra=["--num-blocks", "128"])
    return asyncio.run(traffic_then_scrape(worker))


async def traffic_then_scrape(worker) -> dict:
    """One greedy request and one invalid one through a gateway; then both /metrics pages."""
    gateway_metrics = free_port()
    gateway = Gateway(GatewayOptions(port=0, deployment="test", workers=[worker.address],
                                     metrics_port=gateway_metrics, shutdown_grace=1))  # fmt: skip
    await gateway.start()
    try:
        assert await gateway.wait_for_workers(1, timeout_s=60) == 1
        async with grpc.aio.insecure_channel(gateway.address) as channel:
            ok = await generate(channel, build_request("Hello", max_tokens=8, temperature=0, ignore_eos=True))
            assert ok.completion_tokens == 8
            with pytest.raises(grpc.aio.AioRpcError):
                await generate(channel, build_request("Hello", top_p=2.0))
        return {"worker": exposition(worker.metrics_port), "gateway": exposition(gateway_metrics),
                "worker_samples": scrape(worker.metrics_port)}  # fmt: skip
    finally:
        await gateway.stop(1)


def test_the_worker_reports_vllms_request_phases(scrapes):
    samples = scrapes["worker_samples"]
    for phase in ("queue", "prefill", "decode", "inference"):
        assert samples[f"kvmesh:request_{phase}_time_seconds_count"] == 1
    assert samples["kvmesh:inter_token_latency_seconds_count"] == 7  # 8 tokens, 7 gaps
    assert samples["kvmesh:iteration_tokens_total_count"] >= 8  # the prefill step, then 7 decodes
    assert samples["kvmesh:request_generation_tokens_sum"] == 8
    assert samples["kvmesh:request_prompt_tokens_count"] == 1
    assert any(k.startswith("vllm:cache_config_info{") for k in samples)


def test_worker_and_gateway_share_one_naming_style(scrapes):
    for part, prefixes in (("worker", ("kvmesh:", "vllm:")), ("gateway", ("kvmesh:gateway_",))):
        ours = {n for n in exported_names(scrapes[part]) if not n.startswith(("python_", "process_"))}
        assert ours and all(n.startswith(prefixes) for n in ours), sorted(ours)


def test_every_dashboard_query_names_an_exported_metric(scrapes):
    exported = exported_names(scrapes["worker"]) | exported_names(scrapes["gateway"])
    used = dashboard_names()
    assert len(used) >= 20
    assert used <= exported, sorted(used - exported)


def test_the_dashboard_is_valid_grafana_json_with_unique_panel_ids():
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    assert all(t["expr"] for p in dashboard["panels"] for t in p.get("targets", []))
