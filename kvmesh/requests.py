"""One home for what every front checks in a ``GenerateRequest`` before any model work, and how
a chat becomes a prompt. The worker and the gateway (both protocols) call these, so a bad request
gets the same answer wherever it lands.

``RequestError`` carries a gRPC status code: the gRPC fronts abort with it, the HTTP fronts map it
to an HTTP status (kvmesh/openai_http.py). Engine and model code never see a protocol.
"""

from __future__ import annotations

from typing import Protocol

import grpc

from kvmesh.v1 import inference_pb2

MAX_TOP_LOGPROBS = 20  # OpenAI's limit on top_logprobs
DEFAULT_MAX_TOKENS = 256  # the proto's documented default; workers clamp it to the context left
# Largest request (serialized bytes) a worker or gateway accepts; --max-request-bytes changes it.
# gRPC's own receive limit sits 1 MiB above, so a request just over it gets our clear answer.
MAX_REQUEST_BYTES = 8 * 1024 * 1024
GRPC_HEADROOM_BYTES = 1024 * 1024


class RequestError(Exception):
    """A request that cannot be served, with the status every protocol derives its answer from."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class RequestTooLarge(RequestError):
    """INVALID_ARGUMENT over gRPC, 413 over HTTP."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"the request is {size} bytes; this server accepts at most {limit} (--max-request-bytes)",
        )


def invalid(message: str) -> RequestError:
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, message)


def check_size(request: inference_pb2.GenerateRequest | inference_pb2.TokenizeRequest, limit: int) -> None:
    """Refuses a request over ``limit`` bytes before any work that grows with its size."""
    size = request.ByteSize()
    if size > limit:
        raise RequestTooLarge(size, limit)


def prompt_kind(request: inference_pb2.GenerateRequest) -> str:
    """``text``, ``chat`` or ``token_ids``; raises INVALID_ARGUMENT for a missing or empty prompt."""
    kind = request.WhichOneof("input")
    if kind is None:
        raise invalid("the request has no input: set text, chat or token_ids")
    if kind == "text" and not request.text:
        raise invalid("the prompt is empty")
    if kind == "token_ids" and not request.token_ids.ids:
        raise invalid("the prompt is empty")
    if kind == "chat":
        chat_messages(request.chat)
    return kind


def chat_messages(chat: inference_pb2.ChatInput) -> list[dict[str, str]]:
    """The chat as the ``messages`` list chat templates take; every message needs a role."""
    if not chat.messages:
        raise invalid("chat has no messages")
    if any(not m.role for m in chat.messages):
        raise invalid("every chat message needs a role")
    return [{"role": m.role, "content": m.content} for m in chat.messages]


def add_generation_prompt(chat: inference_pb2.ChatInput) -> bool:
    return chat.add_generation_prompt if chat.HasField("add_generation_prompt") else True


def check_sampling(msg: inference_pb2.SamplingParams) -> None:
    """Protocol-level limits the engine does not know about (the engine validates the rest)."""
    if msg.HasField("logprobs") and msg.logprobs > MAX_TOP_LOGPROBS:
        raise invalid(f"top_logprobs must be in 0..{MAX_TOP_LOGPROBS}, got {msg.logprobs}")


class Tokenizes(Protocol):
    """What turns text and chats into token ids: the worker's engine, or the gateway's tokenizer."""

    def tokenize_text(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def tokenize_chat(
        self, messages: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> list[int]: ...


def prompt_token_ids(tokenizer: Tokenizes, request: inference_pb2.GenerateRequest) -> list[int]:
    """The request's prompt as token ids (chat templates applied by the model's own template)."""
    kind = prompt_kind(request)
    if kind == "token_ids":
        return list(request.token_ids.ids)
    if kind == "text":
        return tokenizer.tokenize_text(request.text)
    return tokenizer.tokenize_chat(chat_messages(request.chat), add_generation_prompt(request.chat))
