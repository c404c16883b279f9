"""`kvmesh operator`: registers the kopf handlers and runs them. Logic lives in the domain modules
(builders, status, autoscaler, reconcile); this file only wires them to events and timers."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import random
from typing import Any

import kopf
from kopf._core.intents.handlers import TimerHandler

from kvmesh.operator import crd
from kvmesh.operator.autoscaler import RedisLoadSource
from kvmesh.operator.builders import OperatorConfig
from kvmesh.operator.kube import Kube, KubeError
from kvmesh.operator.reconcile import Outcome, Reconciler, autoscaling_status
from kvmesh.operator.status import changed as status_changed

RESOURCE = (crd.GROUP, crd.VERSION, crd.PLURAL)
DEFAULT_WORKER_IMAGE = "ghcr.io/kvmesh/kvmesh-worker:0.1.0"


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
    peering = parser.add_mutually_exclusive_group()
    peering.add_argument("--standalone", action="store_true", help="no peering (a single operator replica)")
    peering.add_argument(
        "--peering", metavar="NAME", help="kopf peering object shared by the operator replicas"
    )
    parser.add_argument(
        "--priority",
        type=int,
        help="peering priority; the highest live one works, the others stand by (default: random)",
    )
    parser.add_argument(
        "--liveness", default="http://0.0.0.0:8080/healthz", help="liveness endpoint URL ('' = off)"
    )
    parser.add_argument(
        "--resync-seconds", type=float, default=30.0, help="status, drift repair and autoscaling period"
    )
    parser.add_argument("--worker-image", default=os.environ.get("KVMESH_WORKER_IMAGE", DEFAULT_WORKER_IMAGE))
    parser.add_argument(
        "--image-pull-policy", default="IfNotPresent", choices=["Always", "IfNotPresent", "Never"]
    )
    parser.add_argument(
        "--redis-url",
        default=os.environ.get("KVMESH_REDIS_URL", "redis://kvmesh-redis:6379/0"),
        help="Redis the operator reads load from, and the workers' default (env KVMESH_REDIS_URL)",
    )
    parser.add_argument(
        "--redis-secret",
        metavar="NAME[:KEY]",
        default=os.environ.get("KVMESH_REDIS_SECRET"),
        help="Secret (in each InferenceDeployment's namespace) whose key holds the workers' Redis URL",
    )
    parser.add_argument("--no-autoscaler", action="store_true", help="never read Redis nor scale")
    parser.add_argument("--log-format", choices=["json", "plain", "full"], default="json")
    parser.add_argument("--verbose", "-v", action="store_true")


def operator_config(args: argparse.Namespace) -> OperatorConfig:
    secret_name, _, secret_key = (args.redis_secret or "").partition(":")
    return OperatorConfig(
        worker_image=args.worker_image,
        image_pull_policy=args.image_pull_policy,
        redis_url=args.redis_url,
        redis_secret_name=secret_name or None,
        redis_secret_key=secret_key or "url",
    )


def _write(
    outcome: Outcome,
    patch: kopf.Patch,
    body: Any,
    logger: logging.Logger,
    reconciler: Reconciler,
    retry_after: float | None = None,
) -> None:
    """Status patch, log and events for one pass; with ``retry_after``, a failure is raised for kopf to
    retry the change handler (the timer does not raise: it simply runs again next period)."""
    if status_changed(body.get("status"), outcome.status):
        patch.setdefault("status", {}).update(outcome.status)
    name = f"{body['metadata']['namespace']}/{body['metadata']['name']}"
    if outcome.changed:
        children = ", ".join(outcome.changed)
        logger.info(f"Applied InferenceDeployment children: {children}", extra={"children": children})
        kopf.event(body, type="Normal", reason="Applied", message=f"Applied {children}.")
    meta = body["metadata"]
    if reconciler.is_new_error(meta["namespace"], meta["name"], outcome.error):
        kopf.event(body, type="Warning", reason="ApplyFailed", message=outcome.error or "")
    if outcome.error:
        message = f"Applying the children of InferenceDeployment {name} failed: {outcome.error}"
        if retry_after is None:
            logger.warning(message)
            return
        raise kopf.TemporaryError(message, delay=retry_after)


def _drop_timer_finalizers(registry: kopf.OperatorRegistry) -> None:
    """kopf puts a finalizer on every object a timer runs for, so that deleting an InferenceDeployment
    would hang while no operator runs (e.g. after uninstalling it). Our timer needs no cleanup: children
    go with the garbage collector, and a tick racing a deletion only applies children whose owner is
    gone, which the collector removes. kopf (pinned) exposes no public switch, hence the replace."""
    spawning = registry._spawning
    spawning._handlers[:] = [
        dataclasses.replace(h, requires_finalizer=False) if isinstance(h, TimerHandler) else h
        for h in spawning._handlers
    ]


def register(registry: kopf.OperatorRegistry, reconciler: Reconciler, resync: float) -> None:
    """Wire the handlers. Change handlers converge at once; the timer repairs drift, refreshes status
    from the children's real state and runs the autoscaler."""

    @kopf.on.login(registry=registry)
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        # A custom registry starts without kopf's default login handlers.
        return kopf.login_via_client(**kwargs)

    @kopf.on.resume(*RESOURCE, registry=registry)
    @kopf.on.create(*RESOURCE, registry=registry)
    @kopf.on.update(*RESOURCE, field="spec", registry=registry)
    def converge(body: kopf.Body, patch: kopf.Patch, logger: logging.Logger, **_: Any) -> None:
        _write(reconciler.converge(body), patch, body, logger, reconciler, retry_after=min(resync, 30.0))

    @kopf.timer(*RESOURCE, interval=resync, initial_delay=resync / 2, registry=registry)
    def resync_timer(body: kopf.Body, patch: kopf.Patch, logger: logging.Logger, **_: Any) -> None:
        outcome = reconciler.converge(body)
        if outcome.error is None:
            previous = (body.get("status") or {}).get("autoscaling")
            try:
                decision = reconciler.autoscale(body)
            except KubeError as exc:
                kopf.event(body, type="Warning", reason="ScaleFailed", message=str(exc))
                decision = None
            outcome.status["autoscaling"] = autoscaling_status(decision, previous)
            if decision is not None and decision.scaled:
                logger.info(decision.message, extra={"replicas": decision.desired, "reason": decision.reason})
                kopf.event(body, type="Normal", reason=decision.reason, message=decision.message)
        _write(outcome, patch, body, logger, reconciler)

    _drop_timer_finalizers(registry)

    @kopf.on.delete(*RESOURCE, optional=True, registry=registry)
    def forget(name: str, namespace: str, **_: Any) -> None:
        # The children go with the garbage collector (owner references); only memory is ours to drop.
        reconciler.forget(namespace, name)

    @kopf.on.probe(id="objects", registry=registry)
    def objects(**_: Any) -> int:
        return reconciler.tracked()


class _QuietTimers(logging.Filter):
    """Drops kopf's per-tick "Timer ... succeeded" lines; failures and everything else stay."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (
            record.levelno <= logging.INFO
            and str(record.msg).startswith("Timer ")
            and "succeeded" in str(record.msg)
        )


def settings_for(args: argparse.Namespace) -> kopf.OperatorSettings:
    settings = kopf.OperatorSettings()
    # Keep kopf's bookkeeping in our annotations, out of the status we own.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="kvmesh.io")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix="kvmesh.io")
    # Kubernetes events only from explicit kopf.event() calls (deduplicated there), never one per
    # failed retry or log line.
    settings.posting.level = logging.CRITICAL
    settings.execution.max_workers = 8
    settings.watching.server_timeout = 300
    settings.networking.request_timeout = 60
    if args.peering:
        settings.peering.name = args.peering
        settings.peering.mandatory = True
        settings.peering.priority = args.priority if args.priority is not None else random.randint(1, 2**30)
    else:
        settings.peering.standalone = True
    return settings


def run(args: argparse.Namespace) -> int:
    fmt = {"json": kopf.LogFormat.JSON, "plain": kopf.LogFormat.PLAIN, "full": kopf.LogFormat.FULL}
    kopf.configure(verbose=args.verbose, log_format=fmt[args.log_format])
    if not args.verbose:
        for handler in logging.getLogger().handlers:
            handler.addFilter(_QuietTimers())
    if args.kubeconfig:
        os.environ["KUBECONFIG"] = args.kubeconfig  # for kopf's own login too
    load_source = None if args.no_autoscaler else RedisLoadSource(args.redis_url)
    reconciler = Reconciler(
        Kube.connect(args.kubeconfig), operator_config(args), load_source, source_factory=RedisLoadSource
    )
    registry = kopf.OperatorRegistry()
    register(registry, reconciler, args.resync_seconds)
    namespaces = args.namespace
    logging.getLogger("kvmesh.operator").info(
        "Starting kvmesh operator",
        extra={"namespaces": namespaces or "*", "peering": args.peering or "standalone"},
    )
    kopf.run(
        registry=registry,
        settings=settings_for(args),
        standalone=None if args.peering else True,
        clusterwide=not namespaces,
        namespaces=namespaces,
        liveness_endpoint=args.liveness or None,
    )
    return 0
