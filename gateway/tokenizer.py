"""Prompt -> token ids, once per request, before routing.

Two ways, one answer:

- ``WorkerTokenizer`` (default): asks a worker's ``Inference.Tokenize``. The worker owns the
  model's tokenizer and chat template, so the ids the gateway hashes are by construction the ids
  the worker's prefix cache hashes (a mismatch in special tokens silently breaks precise prefix
  routing, llm-d-kv-cache#211). The gateway stays free of torch and model files, which matters in
  Kubernetes, where its pod has neither. Cost: one loopback/cluster RPC, before routing.
- ``LocalTokenizer`` (``--tokenizer PATH|default``): loads the same tokenizer with transformers in
  the gateway, saving that RPC at the price of importing transformers.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import grpc

from kvmesh.models import chat_token_ids, default_gguf_path
from kvmesh.v1 import inference_pb2

if TYPE_CHECKING:
    from kvmesh.gateway.pool import WorkerPool


class InvalidPrompt(ValueError):
    """Bad input: the gateway answers INVALID_ARGUMENT with this message."""


def prompt_kind(request: inference_pb2.GenerateRequest) -> str:
    kind = request.WhichOneof("input")
    if kind is None:
        raise InvalidPrompt("the request has no input: set text, chat or token_ids")
    if kind == "text" and not request.text:
        raise InvalidPrompt("the prompt is empty")
    if kind == "token_ids" and not request.token_ids.ids:
        raise InvalidPrompt("the prompt is empty")
    if kind == "chat":
        if not request.chat.messages:
            raise InvalidPrompt("chat has no messages")
        if any(not m.role for m in request.chat.messages):
            raise InvalidPrompt("every chat message needs a role")
    return kind


class WorkerTokenizer:
    """Tokenizes through a worker's ``Tokenize``, trying another worker when one is unreachable."""

    def __init__(self, pool: WorkerPool) -> None:
        self.pool = pool

    async def encode(
        self, request: inference_pb2.GenerateRequest, timeout_s: float | None = None
    ) -> list[int]:
        kind = prompt_kind(request)
        if kind == "token_ids":
            return list(request.token_ids.ids)
        tok = inference_pb2.TokenizeRequest(model=request.model)
        if kind == "text":
            tok.text = request.text
        else:
            tok.chat.CopyFrom(request.chat)
        tried: set[str] = set()
        last = "no worker is registered"
        for _ in range(3):
            conn = await self.pool.any_conn(tried)
            if conn is None:
                break
            try:
                return list((await conn.stub.Tokenize(tok, timeout=min(timeout_s or 10.0, 10.0))).token_ids)
            except grpc.aio.AioRpcError as e:
                if e.code() == grpc.StatusCode.INVALID_ARGUMENT:
                    raise InvalidPrompt(e.details() or "invalid prompt") from e
                if e.code() == grpc.StatusCode.UNAVAILABLE:
                    self.pool.mark_down(conn)
                tried.add(conn.worker_id)
                last = f"worker {conn.worker_id}: {e.code().name} {e.details()}"
        raise ConnectionError(f"no worker could tokenize the prompt ({last})")


class LocalTokenizer:
    """The model's tokenizer and chat template, loaded with transformers in the gateway."""

    def __init__(self, model: str) -> None:
        from transformers import AutoTokenizer  # heavy: only when asked for

        path, gguf = resolve_tokenizer_source(model)
        kwargs: dict[str, Any] = {"gguf_file": gguf} if gguf else {}
        self.tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)

    async def encode(
        self, request: inference_pb2.GenerateRequest, timeout_s: float | None = None
    ) -> list[int]:
        kind = prompt_kind(request)
        if kind == "token_ids":
            return list(request.token_ids.ids)
        if kind == "text":
            return list(self.tokenizer(request.text).input_ids)
        chat = request.chat
        add_gen = chat.add_generation_prompt if chat.HasField("add_generation_prompt") else True
        messages = [{"role": m.role, "content": m.content} for m in chat.messages]
        try:
            return chat_token_ids(self.tokenizer, messages, add_gen)
        except ValueError as e:
            raise InvalidPrompt(str(e)) from e


def resolve_tokenizer_source(model: str) -> tuple[str, str | None]:
    """(directory, gguf file name or None) for ``default``, a .gguf file or an HF directory."""
    if model == "default":
        gguf = default_gguf_path()
        return str(gguf.parent), gguf.name
    if model.endswith(".gguf"):
        return os.path.dirname(os.path.abspath(model)), os.path.basename(model)
    return model, None
