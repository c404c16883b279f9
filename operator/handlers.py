"""The kopf handlers: what event runs which pass of the Reconciler (logic lives in the domain modules).

- create/update/resume of an InferenceDeployment: converge its children and write its status;
- watch events of the children (worker Deployment, Service, PDB): refresh the status from the
  Deployment's own progress, and converge again when a child was deleted or edited by someone else;
- one operator-wide loop: the autoscaler, every ``resync`` seconds, for objects that enable it.

No handler needs a finalizer, so deleting an InferenceDeployment never waits for the operator; the
children go with the garbage collector (owner references).
"""

from __future__ import annotations

import asyncio
import copy
import logging
from typing import Any

import kopf

from kvmesh.operator import crd
from kvmesh.operator.builders import MANAGED_BY
from kvmesh.operator.kube import KubeError, Manifest
from kvmesh.operator.reconcile import Outcome, Reconciler, autoscaling_status
from kvmesh.operator.status import changed as status_changed

RESOURCE = (crd.GROUP, crd.VERSION, crd.PLURAL)
CHILDREN = (("apps", "v1", "deployments"), ("", "v1", "services"), ("policy", "v1", "poddisruptionbudgets"))
DEPLOYMENT_LABEL = "kvmesh.io/deployment"

log = logging.getLogger("kvmesh.operator")


def _write(
    outcome: Outcome,
    patch: kopf.Patch,
    body: Any,
    logger: logging.Logger,
    reconciler: Reconciler,
    retry_after: float,
) -> None:
    """Status patch, log and events for a change handler's pass; a failure is raised for kopf to
    retry the handler after ``retry_after`` seconds."""
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
        raise kopf.TemporaryError(message, delay=retry_after)


def write_status(reconciler: Reconciler, body: Manifest, outcome: Outcome) -> None:
    """Status patch and events outside the object's own handlers (child events, the autoscaler)."""
    meta = body["metadata"]
    if outcome.changed:
        children = ", ".join(outcome.changed)
        log.info(f"Applied InferenceDeployment children: {children}", extra={"children": children})
        post(reconciler, meta, "Normal", "Applied", f"Applied {children}.")
    if status_changed(body.get("status"), outcome.status):
        try:
            reconciler.kube.patch_status(meta["namespace"], meta["name"], outcome.status)
        except KubeError as exc:
            log.warning("Writing the InferenceDeployment status failed", extra={"error": str(exc)})
            return
        body.setdefault("status", {}).update(outcome.status)
    # Only failures count here: a status-only event must not reset the one-warning-per-error memory
    # that the change handler's retries rely on.
    if outcome.error and reconciler.is_new_error(meta["namespace"], meta["name"], outcome.error):
        post(reconciler, meta, "Warning", "ApplyFailed", outcome.error)


def post(reconciler: Reconciler, meta: Manifest, type_: str, reason: str, message: str) -> None:
    try:
        reconciler.kube.post_event(meta, type_, reason, message)
    except KubeError as exc:
        log.warning("Posting an event failed", extra={"reason": reason, "error": str(exc)})


def register(registry: kopf.OperatorRegistry, reconciler: Reconciler, resync: float) -> None:
    @kopf.on.login(registry=registry)
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        # A custom registry starts without kopf's default login handlers.
        return kopf.login_via_client(**kwargs)

    @kopf.on.resume(*RESOURCE, registry=registry)
    @kopf.on.create(*RESOURCE, registry=registry)
    @kopf.on.update(*RESOURCE, field="spec", registry=registry)
    def converge(body: kopf.Body, patch: kopf.Patch, logger: logging.Logger, **_: Any) -> None:
        _write(reconciler.converge(body), patch, body, logger, reconciler, retry_after=min(resync, 30.0))

    @kopf.on.event(*RESOURCE, registry=registry)
    def track(body: kopf.Body, type: str | None, name: str, namespace: str, **_: Any) -> None:
        # The operator's view of every InferenceDeployment, for the child events and the autoscaler.
        if type == "DELETED":
            reconciler.forget(namespace, name)
        else:
            reconciler.objects[(namespace, name)] = copy.deepcopy(dict(body))

    def child_changed(body: kopf.Body, type: str | None, namespace: str, labels: Any, **_: Any) -> None:
        owner = reconciler.objects.get((namespace, labels.get(DEPLOYMENT_LABEL, "")))
        if owner is None:
            return
        outcome = reconciler.child_event(owner, copy.deepcopy(dict(body)), deleted=type == "DELETED")
        if outcome is not None:
            write_status(reconciler, owner, outcome)

    managed = {"app.kubernetes.io/managed-by": MANAGED_BY, DEPLOYMENT_LABEL: kopf.PRESENT}
    for group, version, plural in CHILDREN:
        kopf.on.event(group, version, plural, labels=managed, registry=registry)(child_changed)

    @kopf.on.startup(registry=registry)
    async def start_autoscaler(memo: kopf.Memo, **_: Any) -> None:
        memo["autoscaler"] = asyncio.create_task(_autoscale_forever(reconciler, resync))

    @kopf.on.cleanup(registry=registry)
    async def stop_autoscaler(memo: kopf.Memo, **_: Any) -> None:
        task = memo.get("autoscaler")
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    @kopf.on.probe(id="objects", registry=registry)
    def objects(**_: Any) -> int:
        return reconciler.tracked()


async def _autoscale_forever(reconciler: Reconciler, period: float) -> None:
    while True:
        await asyncio.sleep(period)
        for body in list(reconciler.objects.values()):
            if (body.get("spec") or {}).get("autoscaling", {}).get("enabled"):
                await asyncio.to_thread(_autoscale_one, reconciler, body)


def _autoscale_one(reconciler: Reconciler, body: Manifest) -> None:
    meta = body["metadata"]
    previous = (body.get("status") or {}).get("autoscaling")
    try:
        decision = reconciler.autoscale(body)
    except (KubeError, ValueError) as exc:
        post(reconciler, meta, "Warning", "ScaleFailed", str(exc))
        return
    write_status(reconciler, body, Outcome({"autoscaling": autoscaling_status(decision, previous)}))
    if decision is not None and decision.scaled:
        log.info(decision.message, extra={"replicas": decision.desired, "reason": decision.reason})
        post(reconciler, meta, "Normal", decision.reason, decision.message)
