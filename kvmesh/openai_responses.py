"""``GenerateResponse`` protos -> OpenAI's JSON objects: whole completions, stream chunks, usage,
log-probabilities in both shapes (the legacy completions one and chat's), and errors.

Pure functions of the protos, shared by the worker's and the gateway's HTTP fronts.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import grpc

from kvmesh.openai_api import ParsedRequest
from kvmesh.v1 import inference_pb2 as pb

FINISH_REASONS = {
    pb.FINISH_REASON_STOP: "stop",
    pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_ABORT: "abort",
}

# gRPC status -> (HTTP status, OpenAI error type)
HTTP_ERRORS: dict[grpc.StatusCode, tuple[int, str]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found_error"),
    grpc.StatusCode.ALREADY_EXISTS: (409, "conflict_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable_error"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout_error"),
    grpc.StatusCode.UNIMPLEMENTED: (501, "not_implemented_error"),
}


def error_body(status: int, kind: str, message: str, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def grpc_error(code: grpc.StatusCode, message: str) -> tuple[int, dict[str, Any]]:
    status, kind = HTTP_ERRORS.get(code, (500, "internal_error"))
    code_name = "model_not_found" if code == grpc.StatusCode.NOT_FOUND and "model" in message else None
    return status, error_body(status, kind, message, code_name)


def usage(prompt: int, completion: int, cached: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def _token_bytes(token: str) -> list[int]:
    return list(token.encode("utf-8"))


def _as_ids(e: pb.TokenLogprob) -> pb.TokenLogprob:
    out = pb.TokenLogprob(token_id=e.token_id, logprob=e.logprob, token=f"token_id:{e.token_id}")
    for t in e.top:
        out.top.add(token_id=t.token_id, logprob=t.logprob, token=f"token_id:{t.token_id}")
    return out


@dataclass(slots=True)
class ChoiceState:
    """What one choice has produced so far (the whole text for non-streamed answers)."""

    text: list[str] = field(default_factory=list)
    logprobs: list[pb.TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    usage: pb.Usage | None = None


class Formatter:
    """Builds the objects of one answer: same id, creation time and model in each chunk."""

    def __init__(self, parsed: ParsedRequest, model: str) -> None:
        self.parsed = parsed
        self.model = model
        self.created = int(time.time())
        prefix = "chatcmpl" if parsed.chat else "cmpl"
        self.id = f"{prefix}-{uuid.uuid4().hex}"
        self.object = "chat.completion" if parsed.chat else "text_completion"

    @staticmethod
    def finish_reason(response: pb.GenerateResponse) -> str | None:
        return FINISH_REASONS.get(response.finish_reason)

    # -- log-probabilities -------------------------------------------------------------------------
    def logprobs(self, entries: list[pb.TokenLogprob], text_offset: int = 0) -> dict[str, Any] | None:
        if self.parsed.logprobs is None:
            return None
        offsets, pos = [], text_offset
        for e in entries:
            offsets.append(pos)
            pos += len(e.token)
        if self.parsed.tokens_as_ids:
            entries = [_as_ids(e) for e in entries]
        if self.parsed.chat:
            return {"content": [self._chat_entry(e) for e in entries]}
        return {
            "tokens": [e.token for e in entries],
            "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{t.token: t.logprob for t in e.top} for e in entries],
            "text_offset": offsets,
        }

    @staticmethod
    def _chat_entry(e: pb.TokenLogprob) -> dict[str, Any]:
        top = [{"token": t.token, "logprob": t.logprob, "bytes": _token_bytes(t.token)} for t in e.top]
        return {"token": e.token, "logprob": e.logprob, "bytes": _token_bytes(e.token), "top_logprobs": top}

    # -- whole answers ---------------------------------------------------------------------------
    def completion(self, states: dict[int, ChoiceState], echo: dict[int, str]) -> dict[str, Any]:
        choices = []
        for index in sorted(states):
            state = states[index]
            text = "".join(state.text)
            if self.parsed.chat:
                choice: dict[str, Any] = {
                    "index": index,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": self.logprobs(state.logprobs),
                }
            else:
                prefix = echo.get(index, "")
                choice = {
                    "index": index,
                    "text": prefix + text,
                    "logprobs": self.logprobs(state.logprobs, len(prefix)),
                }
            choice["finish_reason"] = state.finish_reason
            choices.append(choice)
        body = self._head(self.object)
        body["choices"] = choices
        body["usage"] = self.total_usage(states)
        return body

    def total_usage(self, states: dict[int, ChoiceState]) -> dict[str, Any]:
        """Prompt tokens count once per distinct prompt (``n`` copies share one), as OpenAI does."""
        prompt = cached = completion = 0
        n = self.parsed.n
        for index, state in states.items():
            if state.usage is None:
                continue
            completion += state.usage.completion_tokens
            if index % n == 0:
                prompt += state.usage.prompt_tokens
                cached += state.usage.cached_tokens
        return usage(prompt, completion, cached)

    # -- stream chunks ---------------------------------------------------------------------------
    def chunk(
        self, index: int, response: pb.GenerateResponse, first: bool, echo: str = "", offset: int = 0
    ) -> dict[str, Any]:
        """One stream event; ``offset`` is where this delta's tokens start in the choice's whole text
        (after the echoed prompt)."""
        finish = self.finish_reason(response)
        if self.parsed.chat:
            delta: dict[str, Any] = {"content": response.text}
            if first:
                delta["role"] = "assistant"
            choice: dict[str, Any] = {"index": index, "delta": delta, "logprobs": None}
            if response.logprobs:
                choice["logprobs"] = self.logprobs(list(response.logprobs))
        else:
            choice = {"index": index, "text": echo + response.text, "logprobs": None}
            if response.logprobs:
                choice["logprobs"] = self.logprobs(list(response.logprobs), offset)
        choice["finish_reason"] = finish
        body = self._head(f"{self.object}.chunk" if self.parsed.chat else self.object)
        body["choices"] = [choice]
        if self.parsed.include_usage:
            body["usage"] = None
        return body

    def usage_chunk(self, states: dict[int, ChoiceState]) -> dict[str, Any]:
        body = self._head(f"{self.object}.chunk" if self.parsed.chat else self.object)
        body["choices"] = []
        body["usage"] = self.total_usage(states)
        return body

    def _head(self, kind: str) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}
