"""``kvmesh generate``: send one prompt to a gateway or a worker and stream the answer.

The prompt is a chat turn (the model's chat template applied) unless ``--raw`` asks for a plain
completion; sampling settings left unset take the model's own defaults.

Also a small async API for tests and benchmarks::

    async with grpc.aio.insecure_channel(target) as channel:
        result = await generate(channel, build_request("Hello", max_tokens=16, temperature=0))
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import grpc

from kvmesh.tls import add_client_flags, api_key_from_env, client_tls
from kvmesh.v1 import inference_pb2, inference_pb2_grpc

DEFAULT_TARGET = os.environ.get("KVMESH_TARGET", "127.0.0.1:50051")
FINISH_REASONS = {
    inference_pb2.FINISH_REASON_UNSPECIFIED: "",
    inference_pb2.FINISH_REASON_STOP: "stop",
    inference_pb2.FINISH_REASON_LENGTH: "length",
    inference_pb2.FINISH_REASON_ABORT: "abort",
}


def build_request(
    prompt: str | None = None,
    *,
    messages: list[dict[str, str]] | None = None,
    token_ids: list[int] | None = None,
    max_tokens: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    seed: int | None = None,
    stop: list[str] | None = None,
    stop_token_ids: list[int] | None = None,
    ignore_eos: bool = False,
    model: str = "",
    request_id: str = "",
    priority: int = 0,
    cache_salt: str = "",
) -> inference_pb2.GenerateRequest:
    """One GenerateRequest from exactly one of prompt, messages or token_ids; None leaves a field unset."""
    request = inference_pb2.GenerateRequest(
        model=model, request_id=request_id, priority=priority, cache_salt=cache_salt
    )
    if messages is not None:
        request.chat.messages.extend(inference_pb2.ChatMessage(**m) for m in messages)
    elif token_ids is not None:
        request.token_ids.SetInParent()
        request.token_ids.ids.extend(token_ids)
    elif prompt is not None:
        request.text = prompt
    sampling = request.sampling
    for name, value in (
        ("max_tokens", max_tokens),
        ("temperature", temperature),
        ("top_p", top_p),
        ("top_k", top_k),
        ("seed", seed),
    ):
        if value is not None:
            setattr(sampling, name, value)
    sampling.stop.extend(stop or [])
    sampling.stop_token_ids.extend(stop_token_ids or [])
    sampling.ignore_eos = ignore_eos
    return request


@dataclass(slots=True)
class GenerateResult:
    request_id: str = ""
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    worker_id: str = ""
    deltas: int = 0  # messages received
    ttft: float | None = None  # seconds to the first token
    latency: float = 0.0  # seconds to the final message


async def stream(
    channel: grpc.aio.Channel, request: inference_pb2.GenerateRequest, timeout: float | None = None
) -> AsyncIterator[inference_pb2.GenerateResponse]:
    """The raw response stream; closing the iterator early cancels the call."""
    call = inference_pb2_grpc.InferenceStub(channel).Generate(request, timeout=timeout)
    try:
        async for response in call:
            yield response
    finally:
        call.cancel()  # no-op once the call has finished


async def generate(
    channel: grpc.aio.Channel,
    request: inference_pb2.GenerateRequest,
    timeout: float | None = None,
    on_delta: Callable[[inference_pb2.GenerateResponse], None] | None = None,
) -> GenerateResult:
    """Runs one request to completion; raises grpc.aio.AioRpcError on an error status."""
    result = GenerateResult()
    start = time.perf_counter()
    async for response in stream(channel, request, timeout):
        result.deltas += 1
        result.request_id = response.request_id or result.request_id
        if response.token_ids and result.ttft is None:
            result.ttft = time.perf_counter() - start
        result.text += response.text
        result.token_ids.extend(response.token_ids)
        if on_delta is not None:
            on_delta(response)
        if response.finish_reason:
            result.finish_reason = FINISH_REASONS.get(response.finish_reason, str(response.finish_reason))
            result.prompt_tokens = response.usage.prompt_tokens
            result.completion_tokens = response.usage.completion_tokens
            result.cached_tokens = response.usage.cached_tokens
            result.worker_id = response.worker_id
    result.latency = time.perf_counter() - start
    return result


def describe_error(e: grpc.RpcError, target: str) -> str:
    """One line for a failed call; a target with nothing listening gets the likely fix."""
    code, details = e.code(), e.details() or ""
    # Connected, then closed during the handshake: TLS on one side only, or a certificate refused.
    if code == grpc.StatusCode.UNAVAILABLE and any(
        s in details.lower() for s in ("socket closed", "ssl", "handshake")
    ):
        return (
            f"error: no TLS session with {target}: it may want TLS (--tls-ca) or a client certificate "
            f"(--tls-cert, --tls-key), or serve plaintext, or not match --tls-ca ({details})"
        )
    if code == grpc.StatusCode.UNAVAILABLE and any(
        s in details.lower() for s in ("connect", "refused", "unreachable", "dns", "no address")
    ):
        return f"error: nothing answers at {target}: is `kvmesh up` (or a worker) running there?"
    if code == grpc.StatusCode.INVALID_ARGUMENT and "no chat template" in details:
        return f"error: {details} (use --raw for a plain completion)"
    return f"error: {code.name}: {details}"


def add_sampling_flags(parser: argparse.ArgumentParser) -> None:
    """Flags shared by ``generate`` and ``chat``; unset ones take the model's own defaults."""
    parser.add_argument(
        "--target", default=DEFAULT_TARGET, help=f"gateway or worker host:port ({DEFAULT_TARGET})"
    )
    add_client_flags(parser)  # TLS; a gateway API key comes from env KVMESH_API_KEY
    parser.add_argument("--model", default="", help="model name (default: the served model)")
    parser.add_argument("--system", default=None, help="system message")
    parser.add_argument("--max-tokens", type=int, default=None)
    parser.add_argument("--temperature", type=float, default=None, help="0 is greedy (default: the model's)")
    parser.add_argument("--top-p", type=float, default=None, help="default: the model's")
    parser.add_argument("--top-k", type=int, default=None, help="default: the model's")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--timeout", type=float, default=None, help="deadline in seconds, per answer")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", nargs="?", default=None, help="the prompt; '-' reads stdin")
    add_sampling_flags(parser)
    parser.add_argument(
        "--raw", action="store_true", help="send the prompt as plain text to complete, not as a chat turn"
    )
    parser.add_argument("--chat", action="store_true", help=argparse.SUPPRESS)  # the default now
    parser.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    parser.add_argument("--ignore-eos", action="store_true")
    parser.add_argument("--cache-salt", default="")
    parser.add_argument("--request-id", default="")


def request_from_args(
    args: argparse.Namespace, prompt: str | None, messages: list[dict[str, str]] | None = None
) -> inference_pb2.GenerateRequest:
    """A request from the command line: a chat turn unless ``--raw`` (or ``messages`` given)."""
    if messages is None and not getattr(args, "raw", False):
        messages = [{"role": "system", "content": args.system}] if args.system else []
        messages.append({"role": "user", "content": prompt or ""})
    return build_request(
        None if messages is not None else prompt,
        messages=messages,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        stop=getattr(args, "stop", None),
        ignore_eos=getattr(args, "ignore_eos", False),
        model=args.model,
        request_id=getattr(args, "request_id", ""),
        cache_salt=getattr(args, "cache_salt", ""),
    )


def read_prompt(args: argparse.Namespace) -> str | None:
    if args.prompt not in (None, "-"):
        return args.prompt
    if args.prompt is None and sys.stdin.isatty():
        return None
    return sys.stdin.read()


def run(args: argparse.Namespace) -> int:
    prompt = read_prompt(args)
    if not (prompt or "").strip():
        print("error: give a prompt (or pipe one in); for a conversation run `kvmesh chat`", file=sys.stderr)
        return 2
    if args.raw and args.system:
        print("error: --system needs a chat turn; drop --raw", file=sys.stderr)
        return 2
    wrote_text = False

    def write(response: inference_pb2.GenerateResponse) -> None:
        nonlocal wrote_text
        wrote_text = wrote_text or bool(response.text)
        sys.stdout.write(response.text)
        sys.stdout.flush()

    async def main() -> GenerateResult:
        async with client_tls(args).channel(args.target, [], api_key_from_env()) as channel:
            return await generate(channel, request_from_args(args, prompt), args.timeout, on_delta=write)

    try:
        result = asyncio.run(main())
    except (OSError, ValueError) as e:  # an unreadable certificate, an API key without TLS
        print(f"error: {e}", file=sys.stderr)
        return 2
    except grpc.aio.AioRpcError as e:
        if wrote_text:
            sys.stdout.write("\n")
        print(describe_error(e, args.target), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    sys.stdout.write("\n")
    ttft = f"{result.ttft:.3f}s" if result.ttft is not None else "-"
    print(
        f"[finish={result.finish_reason} prompt_tokens={result.prompt_tokens} "
        f"completion_tokens={result.completion_tokens} cached_tokens={result.cached_tokens} "
        f"worker={result.worker_id} ttft={ttft} latency={result.latency:.3f}s]",
        file=sys.stderr,
    )
    return 0
