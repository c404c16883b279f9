"""An InferenceDeployment's status, computed from its worker Deployment's real state (pure).

Conditions follow KEP-1623 (metav1.Condition): ``Ready``, ``Progressing`` and ``Degraded``, each with
a CamelCase reason, a message and a ``lastTransitionTime`` that changes only when the status flips.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any

READY = "Ready"
PROGRESSING = "Progressing"
DEGRADED = "Degraded"
CONDITION_TYPES = (READY, PROGRESSING, DEGRADED)

Manifest = dict[str, Any]


@dataclass(slots=True, frozen=True)
class Condition:
    type: str
    status: bool
    reason: str
    message: str


def now_rfc3339() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def merge_conditions(
    previous: list[Manifest] | None, current: list[Condition], generation: int, now: str
) -> list[Manifest]:
    """New condition dicts; ``lastTransitionTime`` kept from ``previous`` unless the status flipped."""
    before = {c.get("type"): c for c in previous or []}
    out = []
    for cond in current:
        status = "True" if cond.status else "False"
        old = before.get(cond.type)
        since = old.get("lastTransitionTime") if old and old.get("status") == status else None
        out.append(
            {
                "type": cond.type,
                "status": status,
                "reason": cond.reason,
                "message": cond.message,
                "lastTransitionTime": since or now,
                "observedGeneration": generation,
            }
        )
    return out


def _deployment_condition(deployment: Manifest, kind: str) -> Manifest | None:
    for cond in (deployment.get("status") or {}).get("conditions") or []:
        if cond.get("type") == kind:
            return cond
    return None


def evaluate(desired: int, deployment: Manifest | None, apply_error: str | None = None) -> list[Condition]:
    """Ready/Progressing/Degraded from the desired replica count and the worker Deployment."""
    if apply_error:
        return [
            Condition(READY, False, "ReconcileFailed", "The worker Deployment could not be applied."),
            Condition(PROGRESSING, False, "ReconcileFailed", apply_error),
            Condition(DEGRADED, True, "ApplyFailed", apply_error),
        ]
    if deployment is None:
        return [
            Condition(READY, False, "DeploymentMissing", "The worker Deployment does not exist yet."),
            Condition(PROGRESSING, True, "Creating", "Creating the worker Deployment."),
            Condition(DEGRADED, False, "AsExpected", ""),
        ]
    status = deployment.get("status") or {}
    generation = deployment.get("metadata", {}).get("generation", 0)
    observed = status.get("observedGeneration", 0)
    replicas = status.get("replicas", 0)
    updated = status.get("updatedReplicas", 0)
    ready = status.get("readyReplicas", 0)
    available = status.get("availableReplicas", 0)

    degraded = Condition(DEGRADED, False, "AsExpected", "")
    progress = _deployment_condition(deployment, "Progressing")
    failure = _deployment_condition(deployment, "ReplicaFailure")
    if (
        progress
        and progress.get("status") == "False"
        and progress.get("reason") == "ProgressDeadlineExceeded"
    ):
        degraded = Condition(DEGRADED, True, "ProgressDeadlineExceeded", progress.get("message", ""))
    elif failure and failure.get("status") == "True":
        degraded = Condition(DEGRADED, True, "ReplicaFailure", failure.get("message", ""))

    if observed < generation:
        progressing = Condition(
            PROGRESSING, True, "RollingOut", "The worker Deployment's new spec is not observed yet."
        )
    elif updated < desired:
        progressing = Condition(PROGRESSING, True, "RollingOut", f"{updated}/{desired} replicas updated.")
    elif replicas > desired:
        progressing = Condition(
            PROGRESSING, True, "ScalingDown", f"{replicas} replicas, scaling down to {desired}."
        )
    elif available < desired:
        progressing = Condition(
            PROGRESSING, True, "WaitingForReplicas", f"{available}/{desired} replicas available."
        )
    else:
        progressing = Condition(PROGRESSING, False, "Complete", f"{desired} replicas up to date.")
    if degraded.reason == "ProgressDeadlineExceeded":
        progressing = Condition(PROGRESSING, False, "ProgressDeadlineExceeded", degraded.message)

    if desired == 0:
        ready_cond = Condition(READY, False, "ScaledToZero", "No replicas are desired.")
    elif ready >= desired:
        ready_cond = Condition(READY, True, "AllReplicasReady", f"{ready}/{desired} replicas ready.")
    elif ready == 0:
        ready_cond = Condition(READY, False, "NoReplicasReady", f"0/{desired} replicas ready.")
    else:
        ready_cond = Condition(READY, False, "ReplicasNotReady", f"{ready}/{desired} replicas ready.")
    return [ready_cond, progressing, degraded]


def compute_status(
    *,
    generation: int,
    desired: int,
    selector: str,
    endpoint: str,
    deployment: Manifest | None,
    previous: Manifest | None,
    apply_error: str | None = None,
    now: str | None = None,
) -> Manifest:
    """The status fields the operator owns (a merge patch for ``.status``).

    ``observedGeneration`` only advances when the children were applied for ``generation``.
    """
    previous = previous or {}
    now = now or now_rfc3339()
    dstatus = (deployment or {}).get("status") or {}
    observed = previous.get("observedGeneration") if apply_error else generation
    return {
        "observedGeneration": observed,
        "replicas": dstatus.get("replicas", 0),
        "readyReplicas": dstatus.get("readyReplicas", 0),
        "updatedReplicas": dstatus.get("updatedReplicas", 0),
        "selector": selector,
        "endpoint": endpoint,
        "conditions": merge_conditions(
            previous.get("conditions"), evaluate(desired, deployment, apply_error), generation, now
        ),
    }


def changed(previous: Manifest | None, new: Manifest) -> bool:
    """Whether writing ``new`` would change anything in ``previous`` (avoids no-op status writes)."""
    previous = previous or {}
    return any(previous.get(k) != v for k, v in new.items())


# The status's OpenAPI schema (part of the CRD, operator/crd.py).
_CONDITION_SCHEMA: Manifest = {
    "type": "object",
    "required": ["type", "status"],
    "properties": {
        "type": {"type": "string", "maxLength": 316},
        "status": {"type": "string", "enum": ["True", "False", "Unknown"]},
        "reason": {"type": "string", "maxLength": 1024},
        "message": {"type": "string", "maxLength": 32768},
        "lastTransitionTime": {"type": "string", "format": "date-time"},
        "observedGeneration": {"type": "integer", "format": "int64", "minimum": 0},
    },
}

STATUS_SCHEMA: Manifest = {
    "type": "object",
    "properties": {
        "observedGeneration": {"type": "integer", "format": "int64"},
        "replicas": {"type": "integer"},
        "readyReplicas": {"type": "integer"},
        "updatedReplicas": {"type": "integer"},
        "selector": {"type": "string", "description": "Label selector of the worker pods (for the HPA)."},
        "endpoint": {"type": "string", "description": "gRPC address of the workers' headless Service."},
        "conditions": {
            "type": "array",
            "items": _CONDITION_SCHEMA,
            "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["type"],
        },
        "autoscaling": {
            "type": "object",
            "properties": {
                "desiredReplicas": {"type": "integer"},
                "currentMetric": {"type": "number"},
                "liveWorkers": {"type": "integer"},
                "reason": {"type": "string"},
                "lastScaleTime": {"type": "string", "format": "date-time"},
            },
        },
    },
}
