"""OpenAI's completions and chat request bodies -> ``GenerateRequest`` protos, strictly checked.

Every OpenAI request becomes one or more ordinary ``GenerateRequest`` messages (one per prompt and
per ``n``), so the HTTP fronts reuse the exact path gRPC requests take. Wrong types and values raise
``RequestError(INVALID_ARGUMENT)`` naming the field, before any model work. Unknown fields are
ignored, as OpenAI-compatible servers do (clients send many); features kvmesh lacks (tools,
multimodal parts) are refused rather than silently dropped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from kvmesh.requests import MAX_TOP_LOGPROBS, invalid
from kvmesh.v1 import inference_pb2 as pb

MAX_N = 16
MAX_BATCH_PROMPTS = 64
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's documented default for /v1/completions
MAX_UINT32 = 2**32 - 1


@dataclass(slots=True)
class Choice:
    """One choice to generate: its index in the answer and the request that produces it."""

    index: int
    request: pb.GenerateRequest
    prompt_text: str = ""  # for echo


@dataclass(slots=True)
class ParsedRequest:
    model: str
    choices: list[Choice]
    n: int = 1  # choices per prompt; choice index = prompt index * n + sample index
    stream: bool = False
    include_usage: bool = False
    logprobs: int | None = None  # top alternatives per token; None: no logprobs
    echo: bool = False
    chat: bool = False
    tokens_as_ids: bool = False  # vLLM's return_tokens_as_token_ids: logprob tokens as "token_id:N"


def _get(body: dict[str, Any], name: str, kinds: type | tuple[type, ...], default: Any = None) -> Any:
    value = body.get(name)
    if value is None:
        return default
    # bool is an int in Python; a JSON true is never a number here.
    if isinstance(value, bool) and bool not in (kinds if isinstance(kinds, tuple) else (kinds,)):
        raise invalid(f"'{name}' must be {_kind_name(kinds)}, got a boolean")
    if not isinstance(value, kinds):
        raise invalid(f"'{name}' must be {_kind_name(kinds)}, got {type(value).__name__}")
    if isinstance(value, float) and not math.isfinite(value):
        raise invalid(f"'{name}' must be a finite number")
    return value


def _kind_name(kinds: type | tuple[type, ...]) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
             dict: "an object"}  # fmt: skip
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    return " or ".join(names.get(k, k.__name__) for k in kinds if not (k is int and float in kinds))


def _int_in(body: dict[str, Any], name: str, low: int, high: int) -> int | None:
    value = _get(body, name, int)
    if value is not None and not low <= value <= high:
        raise invalid(f"'{name}' must be in {low}..{high}, got {value}")
    return value


def sampling(body: dict[str, Any], default_max_tokens: int | None) -> pb.SamplingParams:
    params = pb.SamplingParams(ignore_eos=bool(_get(body, "ignore_eos", bool, False)))
    max_tokens = _int_in(body, "max_completion_tokens", 1, MAX_UINT32)
    if max_tokens is None:
        max_tokens = _int_in(body, "max_tokens", 1, MAX_UINT32)
    if max_tokens is None:
        max_tokens = default_max_tokens
    if max_tokens is not None:
        params.max_tokens = max_tokens
    temperature = _get(body, "temperature", (int, float))
    if temperature is not None:
        if not 0 <= temperature <= 2:
            raise invalid(f"'temperature' must be in [0, 2], got {temperature}")
        params.temperature = float(temperature)
    top_p = _get(body, "top_p", (int, float))
    if top_p is not None:
        if not 0 < top_p <= 1:
            raise invalid(f"'top_p' must be in (0, 1], got {top_p}")
        params.top_p = float(top_p)
    top_k = _int_in(body, "top_k", -1, 2**31 - 1)
    if top_k is not None:
        params.top_k = top_k
    seed = _int_in(body, "seed", -(2**63), 2**64 - 1)
    if seed is not None:
        params.seed = seed % 2**64
    stop = _get(body, "stop", (str, list), [])
    stop = [stop] if isinstance(stop, str) else stop
    if not all(isinstance(s, str) for s in stop):
        raise invalid("'stop' must be a string or an array of strings")
    params.stop.extend(stop)
    stop_ids = _get(body, "stop_token_ids", list, [])
    if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t <= MAX_UINT32 for t in stop_ids):
        raise invalid("'stop_token_ids' must be an array of token ids")
    params.stop_token_ids.extend(stop_ids)
    return params


def _base(body: Any) -> tuple[str, int, str, int]:
    if not isinstance(body, dict):
        raise invalid("the request body must be a JSON object")
    model = _get(body, "model", str, "")
    n = _int_in(body, "n", 1, MAX_N) or 1
    salt = _get(body, "cache_salt", str) or _get(body, "user", str, "")
    priority = _int_in(body, "priority", -(2**31), 2**31 - 1) or 0
    return model, n, salt, priority


def _stream_options(body: dict[str, Any], parsed: ParsedRequest) -> None:
    parsed.tokens_as_ids = bool(_get(body, "return_tokens_as_token_ids", bool, False))
    parsed.stream = bool(_get(body, "stream", bool, False))
    options = _get(body, "stream_options", dict, {})
    if options and not parsed.stream:
        raise invalid("'stream_options' is only allowed when 'stream' is true")
    parsed.include_usage = bool(_get(options, "include_usage", bool, False))


def _fan_out(base: pb.GenerateRequest, n: int, first_index: int, text: str = "") -> list[Choice]:
    """``n`` copies of a request; seeded ones get seed, seed+1, ... so the choices differ."""
    choices = []
    for i in range(n):
        request = pb.GenerateRequest()
        request.CopyFrom(base)
        if i and base.sampling.HasField("seed"):
            request.sampling.seed = (base.sampling.seed + i) % 2**64
        choices.append(Choice(first_index + i, request, text))
    return choices


def parse_completion(body: Any, salt_header: str = "") -> ParsedRequest:
    """POST /v1/completions: prompt as a string, strings, token ids, or lists of token ids."""
    model, n, salt, priority = _base(body)
    prompts = _prompts(body.get("prompt"))
    logprobs = _int_in(body, "logprobs", 0, MAX_TOP_LOGPROBS)
    parsed = ParsedRequest(model=model, choices=[], n=n, logprobs=logprobs)
    parsed.echo = bool(_get(body, "echo", bool, False))
    _stream_options(body, parsed)
    if _get(body, "suffix", str):
        raise invalid("'suffix' is not supported")
    params = sampling(body, COMPLETIONS_DEFAULT_MAX_TOKENS)
    if logprobs is not None:
        params.logprobs = logprobs
    for p, prompt in enumerate(prompts):
        base = pb.GenerateRequest(
            model=model, sampling=params, cache_salt=salt_header or salt, priority=priority
        )
        if isinstance(prompt, str):
            base.text = prompt
        else:
            base.token_ids.ids.extend(prompt)
            if parsed.echo:
                raise invalid("'echo' needs a text prompt (token-id prompts are not detokenized)")
        parsed.choices += _fan_out(base, n, p * n, prompt if isinstance(prompt, str) else "")
    return parsed


def _prompts(prompt: Any) -> list[str | list[int]]:
    if isinstance(prompt, str):
        prompts: list[Any] = [prompt]
    elif isinstance(prompt, list) and prompt and all(_is_token(t) for t in prompt):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt:
        prompts = prompt
    else:
        raise invalid("'prompt' must be a non-empty string, array of strings, or array of token ids")
    if len(prompts) > MAX_BATCH_PROMPTS:
        raise invalid(f"at most {MAX_BATCH_PROMPTS} prompts per request")
    for p in prompts:
        if isinstance(p, str) and p:
            continue
        if isinstance(p, list) and p and all(_is_token(t) for t in p):
            continue
        raise invalid("each prompt must be a non-empty string or a non-empty array of token ids")
    return prompts


def _is_token(t: Any) -> bool:
    return isinstance(t, int) and not isinstance(t, bool) and 0 <= t <= MAX_UINT32


def parse_chat(body: Any, salt_header: str = "") -> ParsedRequest:
    """POST /v1/chat/completions: messages whose content is a string or a list of text parts."""
    model, n, salt, priority = _base(body)
    if body.get("tools") or body.get("functions"):
        raise invalid("tool and function calling are not supported")
    chat = pb.ChatInput(messages=[_message(i, m) for i, m in enumerate(_get(body, "messages", list, []))])
    if not chat.messages:
        raise invalid("'messages' must be a non-empty array")
    wants_logprobs = bool(_get(body, "logprobs", bool, False))
    top = _int_in(body, "top_logprobs", 0, MAX_TOP_LOGPROBS)
    if top is not None and not wants_logprobs:
        raise invalid("'top_logprobs' needs 'logprobs': true")
    logprobs = (top or 0) if wants_logprobs else None
    parsed = ParsedRequest(model=model, choices=[], n=n, chat=True, logprobs=logprobs)
    _stream_options(body, parsed)
    params = sampling(body, None)
    if parsed.logprobs is not None:
        params.logprobs = parsed.logprobs
    base = pb.GenerateRequest(
        model=model, chat=chat, sampling=params, cache_salt=salt_header or salt, priority=priority
    )
    parsed.choices = _fan_out(base, n, 0)
    return parsed


def _message(i: int, message: Any) -> pb.ChatMessage:
    if not isinstance(message, dict):
        raise invalid(f"messages[{i}] must be an object")
    role = message.get("role")
    if not isinstance(role, str) or not role:
        raise invalid(f"messages[{i}].role must be a non-empty string")
    content = message.get("content")
    if content is None:
        content = ""
    elif isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if (
                not isinstance(part, dict)
                or part.get("type") != "text"
                or not isinstance(part.get("text"), str)
            ):
                raise invalid(f"messages[{i}].content[{j}] must be a text part (only text is supported)")
            texts.append(part["text"])
        content = "".join(texts)
    elif not isinstance(content, str):
        raise invalid(f"messages[{i}].content must be a string or an array of text parts")
    return pb.ChatMessage(role=role, content=content)
