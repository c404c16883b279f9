"""Helpers for tests that talk to real worker processes over gRPC (see test_worker_grpc.py)."""

from __future__ import annotations

import asyncio
import time
import urllib.request

import grpc
from prometheus_client.parser import text_string_to_metric_families

from kvmesh.v1 import inference_pb2, inference_pb2_grpc, worker_pb2, worker_pb2_grpc

# A small KV pool and context keep a CPU worker cheap; the shutdown grace bounds the drain test.
WORKER_ARGS = [
    "--num-blocks",
    "256",
    "--max-model-len",
    "2048",
    "--max-num-seqs",
    "16",
    "--shutdown-grace",
    "30",
]


async def wait_for_port(port: int, timeout_s: float = 240.0) -> None:
    """Polls a TCP connect (a gRPC channel's reconnect backoff would be far too coarse)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.02)
            continue
        writer.close()
        return


async def get_load(channel: grpc.aio.Channel) -> worker_pb2.Load:
    return await worker_pb2_grpc.WorkerStub(channel).GetLoad(worker_pb2.GetLoadRequest(), timeout=10)


async def wait_idle(channel: grpc.aio.Channel, timeout_s: float = 20.0) -> worker_pb2.Load:
    """Polls GetLoad until nothing runs, nothing waits and no KV block is held."""
    deadline = time.monotonic() + timeout_s
    while True:
        load = await get_load(channel)
        if load.running == 0 and load.waiting == 0 and load.kv_usage == 0.0:
            return load
        if time.monotonic() > deadline:
            raise AssertionError(f"worker did not become idle: {load}")
        await asyncio.sleep(0.1)


async def tokenize(channel: grpc.aio.Channel, text: str, add_special_tokens: bool = True) -> list[int]:
    request = inference_pb2.TokenizeRequest(text=text, add_special_tokens=add_special_tokens)
    response = await inference_pb2_grpc.InferenceStub(channel).Tokenize(request, timeout=10)
    return list(response.token_ids)


def scrape(metrics_port: int) -> dict[str, float]:
    """Metric samples as ``name{label="value",...}`` -> value (labels sorted, model_name dropped)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()) if k != "model_name")
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples
