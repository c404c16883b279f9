"""``kvmesh worker``: serve one model replica over gRPC.

Engine flags default to None and only flags given on the command line reach
EngineConfig, so the engine's dataclass stays the one source of its defaults.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
import sys
from typing import TYPE_CHECKING

from kvmesh.logs import setup_logging
from kvmesh.redact import ARGV_WARNING, password_in_argv
from kvmesh.tls import add_server_flags, flags_error, server_tls

if TYPE_CHECKING:
    from kvmesh.worker.engine.client import EngineClient

# flag -> (EngineConfig field, type, help). Omitted flags keep EngineConfig's default.
ENGINE_FLAGS: dict[str, tuple[str, type, str]] = {
    "--served-model-name": ("served_model_name", str, "name clients use (default: derived from --model)"),
    "--dtype": ("dtype", str, "weights and activations dtype: auto, float16, bfloat16, float32"),
    "--device": ("device", str, "auto, cpu, cuda or cuda:N"),
    "--block-size": ("block_size", int, "tokens per KV-cache block (default 16)"),
    "--num-blocks": ("num_blocks", int, "KV-cache blocks (default: sized from --gpu-memory-utilization)"),
    "--max-num-seqs": ("max_num_seqs", int, "most sequences in one batch (default 64)"),
    "--max-num-batched-tokens": ("max_num_batched_tokens", int, "token budget per step (default 2048)"),
    "--decode-token-budget": (
        "decode_token_budget",
        int,
        "token budget of a step while streams are decoding (default 1024; keeps inter-token latency even)",
    ),
    "--max-model-len": ("max_model_len", int, "context length (default: the model's)"),
    "--gpu-memory-utilization": ("gpu_memory_utilization", float, "GPU memory fraction to use (default 0.9)"),
    "--tensor-parallel-size": (
        "tensor_parallel_size",
        int,
        "ranks one replica is sharded over: GPUs, or processes on the CPU (default 1)",
    ),
    "--attention-backend": ("attention_backend", str, "auto, torch, triton or flash_attn"),
    "--max-waiting": ("max_waiting", int, "waiting requests before RESOURCE_EXHAUSTED (default 1024)"),
    "--seed": ("seed", int, "engine seed for requests without their own (default 0)"),
    "--quantization": (
        "quantization",
        str,
        "weights: auto (the checkpoint's own format), none, fp8 (quantizes 16-bit weights at load), "
        "gptq, awq or gguf (default auto)",
    ),
    "--kv-cache-dtype": ("kv_cache_dtype", str, "KV cache: auto (the model's dtype) or fp8 (default auto)"),
    "--speculative": ("speculative", str, "speculative decoding: ngram (prompt lookup) or draft"),
    "--speculative-model": ("speculative_model", str, "draft model sharing the tokenizer (implies draft)"),
    "--num-speculative-tokens": ("num_speculative_tokens", int, "proposals verified per step (default 4)"),
    "--ngram-prompt-lookup-min": ("ngram_prompt_lookup_min", int, "shortest suffix matched (default 2)"),
    "--ngram-prompt-lookup-max": ("ngram_prompt_lookup_max", int, "longest suffix matched (default 4)"),
    "--speculative-disable-batch-size": (
        "speculative_disable_batch_size",
        int,
        "requests in the engine (running or waiting) above which no step speculates (default 32)",
    ),
}


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default="default",
        help="HF directory, .gguf file, hf://ORG/REPO[@REVISION][/FILE] or 'default' (SmolLM2-135M)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=50051, help="gRPC port (default 50051)")
    parser.add_argument("--metrics-port", type=int, default=0, help="Prometheus /metrics port (0: off)")
    parser.add_argument(
        "--http-port", type=int, default=None,
        help="OpenAI-compatible HTTP API and /metrics on this port (default: off; 0 picks one)",
    )  # fmt: skip
    parser.add_argument("--worker-id", default=None, help="worker identity (default: hostname-pid)")
    parser.add_argument("--advertise-address", default="", help="host:port gateways dial (default host:port)")
    parser.add_argument(
        "--deployment", default="default", help="[NAMESPACE/]NAME of the deployment this worker belongs to"
    )
    parser.add_argument(
        "--redis-url",
        default=os.environ.get("KVMESH_REDIS_URL", ""),
        help="register and report load to this Redis (env KVMESH_REDIS_URL; password from env "
        "KVMESH_REDIS_PASSWORD or KVMESH_REDIS_PASSWORD_FILE)",
    )
    parser.add_argument(
        "--shutdown-grace", type=float, default=25.0, help="seconds in-flight requests get on SIGTERM"
    )
    parser.add_argument(
        "--max-request-bytes", type=int, default=None,
        help="largest request accepted, in bytes (default 8 MiB); larger: INVALID_ARGUMENT / HTTP 413",
    )  # fmt: skip
    add_server_flags(parser)
    for flag, (_, kind, help_text) in ENGINE_FLAGS.items():
        parser.add_argument(flag, type=kind, default=None, help=help_text)
    parser.add_argument("--no-prefix-caching", action="store_true", help="disable automatic prefix caching")
    parser.add_argument("--enforce-eager", action="store_true", help="disable CUDA graphs")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def engine_kwargs(args: argparse.Namespace) -> dict[str, object]:
    kwargs: dict[str, object] = {"model": args.model}
    for flag, (field, _, _) in ENGINE_FLAGS.items():
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None:
            kwargs[field] = value
    if args.no_prefix_caching:
        kwargs["enable_prefix_caching"] = False
    if args.enforce_eager:
        kwargs["enforce_eager"] = True
    return kwargs


def run(args: argparse.Namespace) -> int:
    setup_logging(args.log_level)
    if password_in_argv(args.redis_url, sys.argv):
        logging.getLogger("kvmesh.worker").warning(ARGV_WARNING)
    # Fast, one-line failures before torch loads: a model that is not there, a port that is taken,
    # a certificate that cannot be read.
    if error := flags_error(args):
        logging.getLogger("kvmesh.worker").error("%s", error)
        return 2
    from kvmesh.ports import taken_ports_error
    from kvmesh.worker.model.loader import ModelNotFound, locate_model

    try:
        locate_model(args.model)
    except ModelNotFound as e:
        logging.getLogger("kvmesh.worker").error("%s", e)
        return 2
    ports = {"--port": args.port, "--metrics-port": args.metrics_port, "--http-port": args.http_port}
    if error := taken_ports_error(args.host, ports):
        logging.getLogger("kvmesh.worker").error("%s", error)
        return 2
    from kvmesh.requests import MAX_REQUEST_BYTES
    from kvmesh.worker.engine.config import EngineConfig
    from kvmesh.worker.server import ServerOptions, serve

    config = EngineConfig(**engine_kwargs(args))
    try:
        config.validate()
    except ValueError as e:
        logging.getLogger("kvmesh.worker").error("Invalid engine settings: %s", e)
        return 2
    options = ServerOptions(
        host=args.host,
        port=args.port,
        worker_id=args.worker_id or f"{socket.gethostname()}-{os.getpid()}",
        advertise_address=args.advertise_address,
        deployment=args.deployment,
        redis_url=args.redis_url,
        metrics_port=args.metrics_port,
        shutdown_grace=args.shutdown_grace,
        http_port=args.http_port,
        max_request_bytes=args.max_request_bytes or MAX_REQUEST_BYTES,
        tls=server_tls(args),
    )

    def load_engine() -> EngineClient:
        # Imported in the loading thread: transformers takes seconds to import, and the port
        # should already answer health checks (NOT_SERVING) meanwhile. The model itself loads in
        # the engine core's process.
        from kvmesh.worker.engine.client import EngineClient

        return EngineClient(config)

    return asyncio.run(serve(options, load_engine))
