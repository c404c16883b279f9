"""`kvmesh operator`: parses its flags, takes the leader Lease when asked to, registers the kopf
handlers (``handlers``) and runs them. Logic lives in the domain modules."""

from __future__ import annotations

import argparse
import contextlib
import http.server
import logging
import os
import signal
import socket
import sys
import threading
import urllib.parse
from collections.abc import Iterator

import kopf

from kvmesh.operator.autoscaler import RedisLoadSource
from kvmesh.operator.builders import OperatorConfig
from kvmesh.operator.handlers import register
from kvmesh.operator.kube import Kube
from kvmesh.operator.leader import LeaderElector
from kvmesh.operator.reconcile import Reconciler
from kvmesh.operator.routing import RoutingPublisher
from kvmesh.operator.spec import SecretKeyRef
from kvmesh.operator.workerpod import RedisDefaults, WorkerTls

DEFAULT_WORKER_IMAGE = "ghcr.io/kvmesh/kvmesh-worker:0.1.0"
log = logging.getLogger("kvmesh.operator")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kubeconfig", help="kubeconfig path (default: in-cluster, then $KUBECONFIG)")
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument(
        "--namespace",
        "-n",
        action="append",
        default=[],
        help="watch this namespace (repeatable; glob patterns)",
    )
    scope.add_argument(
        "--all-namespaces", "-A", action="store_true", help="watch all namespaces (the default)"
    )
    parser.add_argument(
        "--leader-election",
        metavar="NAMESPACE/NAME",
        help="hold this coordination.k8s.io Lease while reconciling (for more than one replica)",
    )
    parser.add_argument(
        "--leader-identity",
        default=os.environ.get("POD_NAME") or f"{socket.gethostname()}-{os.getpid()}",
        help="this replica's name in the Lease (default: $POD_NAME, else host-pid)",
    )
    parser.add_argument("--lease-seconds", type=int, default=15, help="Lease duration (default 15)")
    parser.add_argument(
        "--liveness", default="http://0.0.0.0:8080/healthz", help="liveness endpoint URL ('' = off)"
    )
    parser.add_argument("--resync-seconds", type=float, default=30.0, help="autoscaling period (default 30)")
    parser.add_argument("--worker-image", default=os.environ.get("KVMESH_WORKER_IMAGE", DEFAULT_WORKER_IMAGE))
    parser.add_argument(
        "--image-pull-policy", default="IfNotPresent", choices=["Always", "IfNotPresent", "Never"]
    )
    parser.add_argument(
        "--redis-url",
        default=os.environ.get("KVMESH_REDIS_URL", "redis://kvmesh-redis:6379/0"),
        help="Redis URL without a password (env KVMESH_REDIS_URL): the operator's and the workers' "
        "default; the operator's own password comes from env KVMESH_REDIS_PASSWORD",
    )
    parser.add_argument(
        "--redis-password-secret",
        metavar="NAME[:KEY]",
        default=os.environ.get("KVMESH_REDIS_PASSWORD_SECRET"),
        help="Secret (in each InferenceDeployment's namespace) whose key (default 'password') holds "
        "the Redis password, passed to the workers by env",
    )
    parser.add_argument(
        "--redis-ca-secret",
        metavar="NAME",
        default="",
        help="Secret (in each InferenceDeployment's namespace) whose ca.crt a rediss:// --redis-url "
        "trusts: mounted into the workers at /etc/kvmesh/redis-ca, where the URL's ssl_ca_certs names it",
    )
    parser.add_argument(
        "--worker-tls-secret",
        metavar="NAME",
        default="",
        help="kubernetes.io/tls Secret (in each InferenceDeployment's namespace; tls.crt, tls.key, "
        "ca.crt) the workers serve gRPC and HTTP over TLS with",
    )
    parser.add_argument(
        "--worker-tls-client-auth",
        action="store_true",
        help="workers require client certificates signed by the Secret's ca.crt (mutual TLS)",
    )
    parser.add_argument(
        "--no-autoscaler",
        action="store_true",
        help="never read nor write Redis (no autoscaling, routing settings not published)",
    )
    parser.add_argument("--log-format", choices=["json", "plain", "full"], default="json")
    parser.add_argument("--verbose", "-v", action="store_true")


def operator_config(args: argparse.Namespace) -> OperatorConfig:
    secret_name, _, secret_key = (args.redis_password_secret or "").partition(":")
    password = SecretKeyRef(secret_name, secret_key or "password") if secret_name else None
    return OperatorConfig(
        worker_image=args.worker_image,
        image_pull_policy=args.image_pull_policy,
        redis=RedisDefaults(url=args.redis_url, password_secret=password, ca_secret=args.redis_ca_secret),
        tls=WorkerTls(secret=args.worker_tls_secret, client_auth=args.worker_tls_client_auth),
    )


def settings_for(args: argparse.Namespace) -> kopf.OperatorSettings:
    settings = kopf.OperatorSettings()
    # Keep kopf's bookkeeping in our annotations, out of the status we own.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="kvmesh.io")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix="kvmesh.io")
    # Kubernetes events only from explicit calls (deduplicated there), never one per failed retry or
    # log line.
    settings.posting.level = logging.CRITICAL
    settings.execution.max_workers = 8
    settings.watching.server_timeout = 300
    settings.networking.request_timeout = 60
    settings.peering.standalone = True  # replicas coordinate through the Lease, not kopf peering
    return settings


class _QuietWatch(logging.Filter):
    """Drops kopf's "Handler ... succeeded." line for the watch handlers (one per event of every
    InferenceDeployment and child); failures and every other line stay."""

    WATCHERS = ("track", "child_changed")

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        return not (
            record.levelno <= logging.INFO
            and message.startswith("Handler ")
            and message.endswith("succeeded.")
            and any(f".{name}'" in message for name in self.WATCHERS)
        )


@contextlib.contextmanager
def _standby_liveness(url: str) -> Iterator[None]:
    """Answers the liveness endpoint while this replica waits for the Lease, so a standby is not
    restarted by its liveness probe."""
    if not url:
        yield
        return
    parsed = urllib.parse.urlsplit(url)

    class Alive(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200 if self.path == parsed.path else 404)
            self.end_headers()

        def log_message(self, *_: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer((parsed.hostname or "0.0.0.0", parsed.port or 80), Alive)
    thread = threading.Thread(target=server.serve_forever, name="standby-liveness", daemon=True)
    thread.start()
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()


def run(args: argparse.Namespace) -> int:
    if args.worker_tls_client_auth and not args.worker_tls_secret:
        print("kvmesh operator: --worker-tls-client-auth needs --worker-tls-secret", file=sys.stderr)
        return 2
    fmt = {"json": kopf.LogFormat.JSON, "plain": kopf.LogFormat.PLAIN, "full": kopf.LogFormat.FULL}
    kopf.configure(verbose=args.verbose, log_format=fmt[args.log_format])
    if not args.verbose:
        for handler in logging.getLogger().handlers:
            handler.addFilter(_QuietWatch())
    if args.kubeconfig:
        os.environ["KUBECONFIG"] = args.kubeconfig  # for kopf's own login too
    kube = Kube.connect(args.kubeconfig)
    load_source = None if args.no_autoscaler else RedisLoadSource(args.redis_url)
    routing = None if args.no_autoscaler else RoutingPublisher(args.redis_url)
    reconciler = Reconciler(
        kube, operator_config(args), load_source, source_factory=RedisLoadSource, routing=routing
    )
    registry = kopf.OperatorRegistry()
    register(registry, reconciler, args.resync_seconds)
    stop = threading.Event()  # ends the Lease renewals
    lost = threading.Event()
    elector = None
    if args.leader_election:
        namespace, _, name = args.leader_election.rpartition("/")
        elector = LeaderElector(
            kube, namespace or "default", name, args.leader_identity, lease_seconds=args.lease_seconds
        )
        with _standby_liveness(args.liveness):  # kopf's endpoint starts only with kopf
            if not elector.acquire(stop):
                return 0

        def on_lost() -> None:
            # Stop the way SIGTERM does: kopf finishes its handlers and returns. (kopf's stop_flag
            # waits in an executor thread that would keep its loop from closing.)
            lost.set()
            os.kill(os.getpid(), signal.SIGTERM)

        elector.keep(stop, on_lost=on_lost)
    namespaces = args.namespace
    log.info(
        "Starting kvmesh operator",
        extra={"namespaces": namespaces or "*", "leader": args.leader_identity if elector else "-"},
    )
    try:
        kopf.run(
            registry=registry,
            settings=settings_for(args),
            standalone=True,
            clusterwide=not namespaces,
            namespaces=namespaces,
            liveness_endpoint=args.liveness or None,
        )
    finally:
        stop.set()
        if elector is not None and not lost.is_set():
            elector.release()
    # A leader that lost its Lease exits non-zero: the kubelet restarts it as a standby.
    return 1 if lost.is_set() else 0
