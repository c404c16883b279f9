"""Pure builders of an InferenceDeployment's children: plain dicts, no cluster needed.

Children: the worker Deployment, a headless Service and a PodDisruptionBudget. Each carries a
controller owner reference to the InferenceDeployment, so the garbage collector removes them when it
is deleted. The worker pod itself is built in ``workerpod``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kvmesh.operator import crd
from kvmesh.operator.spec import DeploymentSpec
from kvmesh.operator.workerpod import (
    HTTP_PORT,
    METRICS_PORT,
    WORKER_PORT,
    RedisDefaults,
    WorkerTls,
    build_worker_pod_spec,
    resolve_model,
    worker_container,
)

MANAGED_BY = "kvmesh-operator"
# A rollout may take this long beyond the startup budget (image pulls, scheduling) before Degraded.
PROGRESS_SLACK_S = 600

Manifest = dict[str, Any]


@dataclass(slots=True, frozen=True)
class OperatorConfig:
    """Operator-wide settings the children depend on (from the operator's flags)."""

    worker_image: str = "ghcr.io/kvmesh/kvmesh-worker:0.1.0"
    image_pull_policy: str = "IfNotPresent"
    redis: RedisDefaults = field(default_factory=RedisDefaults)
    tls: WorkerTls = field(default_factory=WorkerTls)
    cluster_domain: str = "svc"


@dataclass(slots=True, frozen=True)
class Owner:
    """The InferenceDeployment the children belong to."""

    name: str
    namespace: str
    uid: str

    @classmethod
    def from_body(cls, body: Any) -> Owner:
        meta = body["metadata"]
        return cls(name=meta["name"], namespace=meta["namespace"], uid=meta["uid"])

    @property
    def deployment_id(self) -> str:
        """The deployment's identity in Redis: ``<namespace>/<name>``."""
        return f"{self.namespace}/{self.name}"


def worker_name(name: str) -> str:
    return f"{name}-worker"


def selector_labels(name: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "kvmesh-worker", "app.kubernetes.io/instance": name}


def selector_string(name: str) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(selector_labels(name).items()))


def common_labels(name: str) -> dict[str, str]:
    return {
        **selector_labels(name),
        "app.kubernetes.io/component": "worker",
        "app.kubernetes.io/part-of": "kvmesh",
        "app.kubernetes.io/managed-by": MANAGED_BY,
        "kvmesh.io/deployment": name,
    }


def endpoint(owner: Owner, config: OperatorConfig) -> str:
    return f"{worker_name(owner.name)}.{owner.namespace}.{config.cluster_domain}:{WORKER_PORT}"


def owner_reference(owner: Owner) -> Manifest:
    return {
        "apiVersion": crd.API_VERSION,
        "kind": crd.KIND,
        "name": owner.name,
        "uid": owner.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _metadata(owner: Owner, name: str) -> Manifest:
    return {
        "name": name,
        "namespace": owner.namespace,
        "labels": common_labels(owner.name),
        "ownerReferences": [owner_reference(owner)],
    }


def build_service(owner: Owner) -> Manifest:
    """Headless Service: stable DNS for the worker pods (one A record per ready pod)."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(owner, worker_name(owner.name)),
        "spec": {
            "clusterIP": "None",
            "selector": selector_labels(owner.name),
            "publishNotReadyAddresses": False,
            "ports": [
                {
                    "name": "grpc",
                    "port": WORKER_PORT,
                    "targetPort": "grpc",
                    "appProtocol": "kubernetes.io/h2c",
                },
                {"name": "metrics", "port": METRICS_PORT, "targetPort": "metrics"},
                {"name": "http", "port": HTTP_PORT, "targetPort": "http", "appProtocol": "http"},
            ],
        },
    }


def build_pdb(owner: Owner) -> Manifest:
    """At most one worker voluntarily disrupted at a time; never blocks drains on unhealthy pods."""
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _metadata(owner, worker_name(owner.name)),
        "spec": {
            "maxUnavailable": 1,
            "selector": {"matchLabels": selector_labels(owner.name)},
            "unhealthyPodEvictionPolicy": "AlwaysAllow",
        },
    }


def build_worker_deployment(owner: Owner, spec: DeploymentSpec, config: OperatorConfig) -> Manifest:
    container = worker_container(
        owner.name,
        owner.namespace,
        spec,
        image=spec.image or config.worker_image,
        pull=spec.image_pull_policy or config.image_pull_policy,
        redis=config.redis,
        tls=config.tls,
    )
    pod_spec = build_worker_pod_spec(spec, container, resolve_model(spec), config.tls, config.redis)
    override_meta = spec.pod_template.get("metadata") or {}
    annotations = {
        **(override_meta.get("annotations") or {}),
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(METRICS_PORT),
    }
    labels = {**(override_meta.get("labels") or {}), **common_labels(owner.name)}
    rollout = spec.rollout
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(owner, worker_name(owner.name)),
        "spec": {
            "replicas": spec.replicas,
            "selector": {"matchLabels": selector_labels(owner.name)},
            "revisionHistoryLimit": 3,
            # A healthy but slow model load must not read as a stalled rollout (Degraded).
            "progressDeadlineSeconds": rollout.startup_timeout_s + PROGRESS_SLACK_S,
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxSurge": rollout.max_surge, "maxUnavailable": rollout.max_unavailable},
            },
            "template": {"metadata": {"labels": labels, "annotations": annotations}, "spec": pod_spec},
        },
    }


def build_children(owner: Owner, spec: DeploymentSpec, config: OperatorConfig) -> list[Manifest]:
    """All children, in apply order."""
    return [build_service(owner), build_pdb(owner), build_worker_deployment(owner, spec, config)]
