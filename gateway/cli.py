"""``kvmesh gateway``: the prefix-aware gateway in front of a deployment's workers."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys

from kvmesh.gateway.router import POLICIES
from kvmesh.logs import setup_logging
from kvmesh.redact import ARGV_WARNING, password_in_argv
from kvmesh.tls import (
    add_server_flags,
    add_worker_client_flags,
    flags_error,
    server_tls,
    worker_client_tls,
)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=50050, help="gRPC port (default 50050; 0 picks one)")
    parser.add_argument("--metrics-port", type=int, default=0, help="Prometheus /metrics port (0: off)")
    parser.add_argument(
        "--http-port", type=int, default=None,
        help="OpenAI-compatible HTTP API on this port (default: off; 0 picks one)",
    )  # fmt: skip
    parser.add_argument(
        "--deployment",
        default="default",
        help="[NAMESPACE/]NAME of the deployment whose workers to route to (comma-separated: several)",
    )
    parser.add_argument(
        "--redis-url",
        default=os.environ.get("KVMESH_REDIS_URL", ""),
        help="shared metadata store (env KVMESH_REDIS_URL; password from env KVMESH_REDIS_PASSWORD or "
        "KVMESH_REDIS_PASSWORD_FILE); without it, an in-process store fed by --worker",
    )
    parser.add_argument(
        "--worker", action="append", default=[], metavar="HOST:PORT",
        help="a worker to watch over its Worker API (repeatable; in-process store only)",
    )  # fmt: skip
    parser.add_argument(
        "--tokenizer", default="worker",
        help="'worker' (ask a worker's Tokenize, default), 'default' (SmolLM2) or a model path to load here",
    )  # fmt: skip
    parser.add_argument(
        "--policy",
        choices=POLICIES,
        help="routing policy (default: the deployment's spec.routing published in Redis, else prefix)",
    )
    parser.add_argument(
        "--load-factor",
        type=float,
        help="skip workers above this x mean load (default: the published spec.routing, else 1.25)",
    )
    parser.add_argument(
        "--key-blocks", type=int, default=4, help="blocks naming a prefix for hashing (default 4)"
    )
    parser.add_argument(
        "--max-inflight", type=int, default=64, help="requests in flight per worker (default 64)"
    )
    parser.add_argument("--max-attempts", type=int, default=3, help="workers tried before the first token")
    parser.add_argument(
        "--max-timeout", type=float, default=600.0, help="clamp on request deadlines, seconds"
    )
    parser.add_argument("--shutdown-grace", type=float, default=25.0, help="seconds streams get on SIGTERM")
    parser.add_argument(
        "--max-request-bytes", type=int, default=None,
        help="largest request accepted, in bytes (default 8 MiB); larger: INVALID_ARGUMENT / HTTP 413",
    )  # fmt: skip
    parser.add_argument(
        "--max-connection-age", type=float, default=0.0,
        help="seconds before a client connection is asked to reconnect (GOAWAY; calls in flight finish), "
        "so long-lived clients spread over gateway replicas added later; 0: never",
    )  # fmt: skip
    add_server_flags(parser)
    add_worker_client_flags(parser)
    parser.add_argument(
        "--api-keys-file", default="", help="JSON file: API key -> tenant, cache salt, per-minute limits"
    )
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def options_from_args(args: argparse.Namespace, published: dict[str, str] | None = None):
    """Flags given on the command line win; then the routing settings the operator published for the
    deployment (``published``); then GatewayOptions' defaults."""
    from kvmesh.gateway.server import GatewayOptions
    from kvmesh.requests import MAX_REQUEST_BYTES

    routing: dict[str, object] = {}
    published = published or {}
    if args.policy or published.get("policy") in POLICIES:
        routing["policy"] = args.policy or published["policy"]
    if args.load_factor is not None:
        routing["load_factor"] = args.load_factor
    elif _number(published.get("load_factor")) >= 1.0:
        routing["load_factor"] = _number(published["load_factor"])
    return GatewayOptions(
        host=args.host,
        port=args.port,
        metrics_port=args.metrics_port,
        http_port=args.http_port,
        deployment=args.deployment,
        redis_url=args.redis_url,
        workers=list(args.worker),
        tokenizer=args.tokenizer,
        **routing,
        key_blocks=args.key_blocks,
        max_inflight=args.max_inflight,
        max_attempts=args.max_attempts,
        max_timeout_s=args.max_timeout,
        shutdown_grace=args.shutdown_grace,
        max_request_bytes=args.max_request_bytes or MAX_REQUEST_BYTES,
        max_connection_age_s=args.max_connection_age,
        tls=server_tls(args),
        worker_tls=worker_client_tls(args),
        api_keys_file=args.api_keys_file,
    )


def run(args: argparse.Namespace) -> int:
    setup_logging(args.log_level)
    if password_in_argv(args.redis_url, sys.argv):
        logging.getLogger("kvmesh.gateway").warning(ARGV_WARNING)
    if not args.redis_url and not args.worker:
        print("kvmesh gateway: give --redis-url or at least one --worker", file=sys.stderr)
        return 2
    if error := flags_error(args):
        print(f"kvmesh gateway: {error}", file=sys.stderr)
        return 2
    from kvmesh.ports import taken_ports_error

    ports = {"--port": args.port, "--metrics-port": args.metrics_port, "--http-port": args.http_port}
    if error := taken_ports_error(args.host, ports):
        print(f"kvmesh gateway: {error}", file=sys.stderr)
        return 2
    from kvmesh.gateway.server import serve

    published = asyncio.run(_published_routing(args)) if args.redis_url else {}
    return asyncio.run(serve(options_from_args(args, published)))


def _number(value: str | None) -> float:
    try:
        return float(value or "nan")
    except ValueError:
        return float("nan")


async def _published_routing(args: argparse.Namespace) -> dict[str, str]:
    """The (first) deployment's spec.routing as the operator published it ({} when absent or
    unreachable: the gateway still starts, with its defaults)."""
    if args.policy and args.load_factor is not None:
        return {}
    from kvmesh.store import StoreError
    from kvmesh.store.redis_store import RedisStore

    store = RedisStore(args.redis_url, args.deployment.split(",")[0], socket_timeout_s=2.0)
    try:
        return await store.routing()
    except StoreError:
        return {}
    finally:
        await store.close()
