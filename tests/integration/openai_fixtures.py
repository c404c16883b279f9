"""Helpers for tests that drive kvmesh's OpenAI HTTP API with clients nobody here wrote: the
official ``openai`` package and ``curl``."""

from __future__ import annotations

import json
import shutil
import subprocess

import grpc
import pytest

from kvmesh.v1 import inference_pb2 as pb
from kvmesh.v1 import inference_pb2_grpc

MODEL = "SmolLM2-135M-Instruct"
QUESTION = "What is the capital of France?"


def curl(url: str, *args: str, timeout: int = 120) -> tuple[int, str]:
    """(HTTP status, body) from the real curl binary."""
    binary = shutil.which("curl")
    if binary is None:
        pytest.skip("curl is not installed")
    out = subprocess.run(
        [binary, "-sS", "-N", "-o", "-", "-w", "\n%{http_code}", *args, url],
        capture_output=True, text=True, timeout=timeout, check=True,
    )  # fmt: skip
    body, _, status = out.stdout.rpartition("\n")
    return int(status), body


def sse_events(body: str) -> list[str]:
    return [line[len("data: ") :] for line in body.splitlines() if line.startswith("data: ")]


def error_of(body: str) -> dict:
    error = json.loads(body)["error"]
    assert set(error) >= {"message", "type", "code"}, error
    assert "Traceback" not in error["message"]
    return error


async def grpc_tokens(address: str, request: pb.GenerateRequest) -> tuple[list[int], str]:
    """(token ids, text) of a whole generation over gRPC."""
    async with grpc.aio.insecure_channel(address) as channel:
        ids, text = [], []
        async for response in inference_pb2_grpc.InferenceStub(channel).Generate(request, timeout=120):
            ids += response.token_ids
            text.append(response.text)
        return ids, "".join(text)
