"""Prompt -> token ids, once per request, before routing.

Two ways, one answer:

- ``WorkerTokenizer`` (default): asks a worker's ``Inference.Tokenize``. The worker owns the
  model's tokenizer and chat template, so the ids the gateway hashes are by construction the ids
  the worker's prefix cache hashes (a mismatch in special tokens silently breaks precise prefix
  routing, llm-d-kv-cache#211). The gateway stays free of torch and model files, which matters in
  Kubernetes, where its pod has neither. Cost: one loopback/cluster RPC, before routing.
- ``LocalTokenizer`` (``--tokenizer PATH|default``): loads the same tokenizer with transformers in
  the gateway, saving that RPC at the price of importing transformers (one model only).

Both check the prompt with ``kvmesh.requests``, the checks the worker runs too.
"""

from __future__ import annotations

import asyncio
import os
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import grpc

from kvmesh.models import chat_token_ids, default_gguf_path
from kvmesh.requests import RequestError, invalid, prompt_kind, prompt_token_ids
from kvmesh.v1 import inference_pb2

if TYPE_CHECKING:
    from kvmesh.gateway.models import ModelTarget


class WorkerTokenizer:
    """Tokenizes through the ``Tokenize`` of a worker serving the request's model, trying another
    worker when one is unreachable."""

    async def encode(
        self, request: inference_pb2.GenerateRequest, target: ModelTarget, timeout_s: float | None = None
    ) -> list[int]:
        kind = prompt_kind(request)
        if kind == "token_ids":
            return list(request.token_ids.ids)
        tok = inference_pb2.TokenizeRequest(model=target.name)
        if kind == "text":
            tok.text = request.text
        else:
            tok.chat.CopyFrom(request.chat)
        tried: set[str] = set()
        last = "no worker is registered"
        for _ in range(3):
            conn = await target.pool.any_conn(tried, target.name)
            if conn is None:
                break
            try:
                return list((await conn.stub.Tokenize(tok, timeout=min(timeout_s or 10.0, 10.0))).token_ids)
            except grpc.aio.AioRpcError as e:
                if e.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND):
                    raise RequestError(e.code(), e.details() or "invalid prompt") from e
                if e.code() == grpc.StatusCode.UNAVAILABLE:
                    target.pool.mark_down(conn)
                tried.add(conn.worker_id)
                last = f"worker {conn.worker_id}: {e.code().name} {e.details()}"
        raise RequestError(grpc.StatusCode.UNAVAILABLE, f"no worker could tokenize the prompt ({last})")


class LocalTokenizer:
    """The model's tokenizer and chat template, loaded with transformers in the gateway (one model)."""

    def __init__(self, model: str) -> None:
        from transformers import AutoTokenizer  # heavy: only when asked for

        path, gguf = resolve_tokenizer_source(model)
        kwargs: dict[str, Any] = {"gguf_file": gguf} if gguf else {}
        self.tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
        self.thread = ThreadPoolExecutor(1, thread_name_prefix="kvmesh-tokenize")

    def tokenize_text(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=add_special_tokens).input_ids)

    def tokenize_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
        try:
            return chat_token_ids(self.tokenizer, messages, add_generation_prompt)
        except ValueError as e:
            raise invalid(str(e)) from e

    async def encode(
        self,
        request: inference_pb2.GenerateRequest,
        target: ModelTarget | None = None,
        timeout_s: float | None = None,
    ) -> list[int]:
        if request.ByteSize() < 8192:
            return prompt_token_ids(self, request)
        # Large prompts tokenize on one thread of their own, off the event loop.
        return await asyncio.get_running_loop().run_in_executor(self.thread, prompt_token_ids, self, request)


def resolve_tokenizer_source(model: str) -> tuple[str, str | None]:
    """(directory, gguf file name or None) for ``default``, a .gguf file or an HF directory."""
    if model == "default":
        gguf = default_gguf_path()
        return str(gguf.parent), gguf.name
    if model.endswith(".gguf"):
        return os.path.dirname(os.path.abspath(model)), os.path.basename(model)
    return model, None
