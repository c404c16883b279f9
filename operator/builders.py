"""Pure builders of an InferenceDeployment's children: plain dicts, no cluster needed.

Children: the worker Deployment, a headless Service, a PodDisruptionBudget and a ConfigMap. Each
carries a controller owner reference to the InferenceDeployment, so the garbage collector removes
them when it is deleted.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from kvmesh.operator import crd

WORKER_PORT = 50051
METRICS_PORT = 9090
MODEL_MOUNT = "/models"
CACHE_DIR = "/var/cache/kvmesh"
CONFIG_DIR = "/etc/kvmesh"
RUN_AS_USER = 1000
MANAGED_BY = "kvmesh-operator"
CONFIG_HASH_ANNOTATION = "kvmesh.io/config-hash"

Manifest = dict[str, Any]

TERMINATION_GRACE_S = 60  # the worker pod's grace period; streams drain within it


@dataclass(slots=True, frozen=True)
class OperatorConfig:
    """Operator-wide settings the children depend on (from the operator's flags)."""

    worker_image: str = "ghcr.io/kvmesh/kvmesh-worker:0.1.0"
    image_pull_policy: str = "IfNotPresent"
    redis_url: str = "redis://kvmesh-redis:6379/0"
    redis_secret_name: str | None = None
    redis_secret_key: str = "url"
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


@dataclass(slots=True, frozen=True)
class ModelLocation:
    """Where a model source resolves to inside the worker pod."""

    scheme: str  # hf | pvc | hostpath
    model_arg: str  # the value of `kvmesh worker --model`
    volume: Manifest  # the pod volume named "model"


def worker_name(name: str) -> str:
    return f"{name}-worker"


def config_name(name: str) -> str:
    return f"{name}-config"


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


def resolve_model(model: Manifest) -> ModelLocation:
    """Map ``spec.model`` to the worker's ``--model`` argument and the volume holding the weights."""
    source: str = model["source"]
    file = model.get("file")
    if source.startswith("hf://"):
        # The worker downloads into its cache volume; a file inside the repo travels by env.
        return ModelLocation("hf", source.removeprefix("hf://"), {"name": "model", "emptyDir": {}})
    if source.startswith("pvc://"):
        claim, _, sub_path = source.removeprefix("pvc://").partition("/")
        path = "/".join(p for p in (MODEL_MOUNT, sub_path.strip("/"), file) if p)
        volume = {"name": "model", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}}
        return ModelLocation("pvc", path, volume)
    if source.startswith("hostpath://"):
        host_path = "/" + source.removeprefix("hostpath://").lstrip("/")
        path = f"{MODEL_MOUNT}/{file}" if file else MODEL_MOUNT
        volume = {"name": "model", "hostPath": {"path": host_path, "type": "Directory"}}
        return ModelLocation("hostpath", path, volume)
    raise ValueError(f"unsupported model source {source!r}; use hf://, pvc:// or hostpath://")


def worker_command(name: str, spec: Manifest) -> list[str]:
    """The worker container's command: the contract with `kvmesh worker`'s CLI."""
    spec = crd.apply_defaults(spec)
    engine = spec["engine"]
    location = resolve_model(spec["model"])
    return [
        "kvmesh",
        "worker",
        "--model",
        location.model_arg,
        "--host",
        "0.0.0.0",
        "--port",
        str(WORKER_PORT),
        "--metrics-port",
        str(METRICS_PORT),
        "--worker-id",
        "$(POD_NAME)",
        "--advertise-address",
        f"$(POD_IP):{WORKER_PORT}",
        "--deployment",
        name,
        "--redis-url",
        "$(KVMESH_REDIS_URL)",
        "--dtype",
        engine["dtype"],
        "--block-size",
        str(engine["blockSize"]),
        "--max-num-seqs",
        str(engine["maxNumSeqs"]),
        "--max-model-len",
        str(engine["maxModelLen"]),
        "--gpu-memory-utilization",
        _number(engine["gpuMemoryUtilization"]),
        "--tensor-parallel-size",
        str(engine["tensorParallelSize"]),
        # In-flight streams get the pod's grace period, less time to exit before SIGKILL.
        "--shutdown-grace",
        str(TERMINATION_GRACE_S - 5),
        *(["--served-model-name", spec["model"]["servedName"]] if spec["model"].get("servedName") else []),
        *engine.get("extraArgs", []),
    ]


def gateway_args(name: str, spec: Manifest, redis_url: str = "$(KVMESH_REDIS_URL)") -> list[str]:
    """Arguments of a `kvmesh gateway` serving this deployment (written into the ConfigMap).

    No block size: gateways take it from the workers' registrations (the same engine.blockSize)."""
    spec = crd.apply_defaults(spec)
    routing = spec["routing"]
    return [
        "--host",
        "0.0.0.0",
        "--port",
        str(WORKER_PORT),
        "--metrics-port",
        str(METRICS_PORT),
        "--redis-url",
        redis_url,
        "--deployment",
        name,
        "--policy",
        routing["policy"],
        "--load-factor",
        _number(routing["loadFactor"]),
    ]


def _number(value: float) -> str:
    return format(float(value), "g")


def _redis_env(spec: Manifest, config: OperatorConfig) -> Manifest:
    redis = spec.get("redis") or {}
    ref = redis.get("urlSecretRef")
    if ref:
        return {
            "name": "KVMESH_REDIS_URL",
            "valueFrom": {"secretKeyRef": {"name": ref["name"], "key": ref["key"]}},
        }
    if redis.get("url"):
        return {"name": "KVMESH_REDIS_URL", "value": redis["url"]}
    if config.redis_secret_name:
        secret = {"name": config.redis_secret_name, "key": config.redis_secret_key}
        return {"name": "KVMESH_REDIS_URL", "valueFrom": {"secretKeyRef": secret}}
    return {"name": "KVMESH_REDIS_URL", "value": config.redis_url}


def worker_env(owner: Owner, spec: Manifest, config: OperatorConfig) -> list[Manifest]:
    model = spec["model"]
    hf_root = MODEL_MOUNT if model["source"].startswith("hf://") else CACHE_DIR
    env: list[Manifest] = [
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        _redis_env(spec, config),
        {"name": "KVMESH_DEPLOYMENT", "value": owner.name},
        {"name": "KVMESH_MODEL", "value": model["source"]},
        # hf:// weights download into the "model" volume; other sources only cache tokenizers there.
        {"name": "HF_HOME", "value": f"{hf_root}/huggingface"},
        # The root filesystem is read-only: every cache a worker writes lives on the cache volume.
        {"name": "KVMESH_CACHE", "value": f"{CACHE_DIR}/kvmesh"},
        {"name": "XDG_CACHE_HOME", "value": CACHE_DIR},
        {"name": "TRITON_CACHE_DIR", "value": f"{CACHE_DIR}/triton"},
        {"name": "TRITON_HOME", "value": CACHE_DIR},
    ]
    optional = {
        "KVMESH_MODEL_FILE": model.get("file"),
        "KVMESH_MODEL_REVISION": model.get("revision"),
        "KVMESH_TOKENIZER": model.get("tokenizer"),
        "KVMESH_SERVED_MODEL_NAME": model.get("servedName"),
    }
    env += [{"name": k, "value": v} for k, v in optional.items() if v]
    user = [dict(e) for e in spec.get("env") or []]
    overridden = {e.get("name") for e in user}
    return [e for e in env if e["name"] not in overridden] + user


def _grpc_probe(period: int, failures: int, timeout: int = 5) -> Manifest:
    return {
        "grpc": {"port": WORKER_PORT},
        "periodSeconds": period,
        "failureThreshold": failures,
        "timeoutSeconds": timeout,
    }


def _resources(resources: Manifest) -> Manifest:
    requests: dict[str, Any] = {}
    limits: dict[str, Any] = {}
    if resources.get("cpu") is not None:
        requests["cpu"] = str(resources["cpu"])
    if resources.get("memory") is not None:
        requests["memory"] = limits["memory"] = str(resources["memory"])
    if resources["gpus"] > 0:
        # Extended resources: request must equal limit.
        requests[resources["gpuResourceName"]] = limits[resources["gpuResourceName"]] = str(resources["gpus"])
    out: Manifest = {}
    if requests:
        out["requests"] = requests
    if limits:
        out["limits"] = limits
    return out


def config_data(owner: Owner, spec: Manifest) -> dict[str, str]:
    """The ConfigMap's data: the resolved deployment settings, for workers, gateways and humans."""
    spec = crd.apply_defaults(spec)
    routing = dict(spec["routing"])
    routing.setdefault("blockSize", spec["engine"]["blockSize"])
    resolved = {
        "deployment": owner.name,
        "model": spec["model"],
        "engine": spec["engine"],
        "routing": routing,
        "endpointPort": WORKER_PORT,
    }
    return {
        "deployment.json": json.dumps(resolved, indent=2, sort_keys=True) + "\n",
        "gateway-args": " ".join(gateway_args(owner.name, spec)) + "\n",
    }


def config_hash(spec: Manifest) -> str:
    """Hash of what the worker process reads (model and engine); routing or replica changes do not
    restart workers."""
    spec = crd.apply_defaults(spec)
    relevant = {"model": spec["model"], "engine": spec["engine"]}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def build_configmap(owner: Owner, spec: Manifest) -> Manifest:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(owner, config_name(owner.name)),
        "data": config_data(owner, spec),
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


def _merge_pod_spec(pod_spec: Manifest, override: Manifest) -> Manifest:
    """Merge ``spec.podTemplate.spec`` over the built pod spec: lists append, maps merge, scalars replace.

    The worker container itself is not overridable here (use engine.extraArgs, env, resources)."""
    out = copy.deepcopy(pod_spec)
    for key, value in override.items():
        if key in ("containers",):
            continue
        if isinstance(value, list) and isinstance(out.get(key), list):
            out[key] = out[key] + copy.deepcopy(value)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = {**out[key], **copy.deepcopy(value)}
        else:
            out[key] = copy.deepcopy(value)
    return out


def _model_mount(location: ModelLocation) -> Manifest:
    mount: Manifest = {"name": "model", "mountPath": MODEL_MOUNT}
    if location.scheme != "hf":  # hf:// weights are downloaded into it
        mount["readOnly"] = True
    return mount


def build_worker_deployment(owner: Owner, spec: Manifest, config: OperatorConfig) -> Manifest:
    spec = crd.apply_defaults(spec)
    resources = spec["resources"]
    location = resolve_model(spec["model"])
    container: Manifest = {
        "name": "worker",
        "image": spec.get("image") or config.worker_image,
        "imagePullPolicy": spec.get("imagePullPolicy") or config.image_pull_policy,
        "command": worker_command(owner.name, spec),
        "env": worker_env(owner, spec, config),
        "ports": [
            {"name": "grpc", "containerPort": WORKER_PORT, "protocol": "TCP"},
            {"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"},
        ],
        "resources": _resources(resources),
        # Loading weights can take long: the startup probe allows an hour, then liveness takes over.
        "startupProbe": _grpc_probe(period=10, failures=360),
        "readinessProbe": _grpc_probe(period=5, failures=3),
        "livenessProbe": _grpc_probe(period=10, failures=6),
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": [
            _model_mount(location),
            {"name": "cache", "mountPath": CACHE_DIR},
            {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
            {"name": "tmp", "mountPath": "/tmp"},
            {"name": "dshm", "mountPath": "/dev/shm"},
        ],
    }
    tolerations = list(resources.get("tolerations") or [])
    if resources["gpus"] > 0 and not tolerations:
        tolerations = [{"key": resources["gpuResourceName"], "operator": "Exists", "effect": "NoSchedule"}]
    pod_spec: Manifest = {
        "containers": [container],
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": TERMINATION_GRACE_S,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUN_AS_USER,
            "runAsGroup": RUN_AS_USER,
            "fsGroup": RUN_AS_USER,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumes": [
            location.volume,
            {"name": "cache", "emptyDir": {}},
            {"name": "config", "configMap": {"name": config_name(owner.name)}},
            {"name": "tmp", "emptyDir": {}},
            {"name": "dshm", "emptyDir": {"medium": "Memory"}},
        ],
    }
    if resources.get("nodeSelector"):
        pod_spec["nodeSelector"] = dict(resources["nodeSelector"])
    if tolerations:
        pod_spec["tolerations"] = tolerations
    template_override = spec.get("podTemplate") or {}
    if template_override.get("spec"):
        pod_spec = _merge_pod_spec(pod_spec, template_override["spec"])
    override_meta = template_override.get("metadata") or {}
    annotations = {
        **(override_meta.get("annotations") or {}),
        CONFIG_HASH_ANNOTATION: config_hash(spec),
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(METRICS_PORT),
    }
    labels = {**(override_meta.get("labels") or {}), **common_labels(owner.name)}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(owner, worker_name(owner.name)),
        "spec": {
            "replicas": spec["replicas"],
            "selector": {"matchLabels": selector_labels(owner.name)},
            "revisionHistoryLimit": 3,
            "progressDeadlineSeconds": 1800,
            # A surge pod needs a spare GPU; without one the rollout stalls visibly (Degraded) instead
            # of taking a serving replica down.
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "template": {"metadata": {"labels": labels, "annotations": annotations}, "spec": pod_spec},
        },
    }


def build_children(owner: Owner, spec: Manifest, config: OperatorConfig) -> list[Manifest]:
    """All children, in apply order (the ConfigMap before the pods that mount it)."""
    return [
        build_configmap(owner, spec),
        build_service(owner),
        build_pdb(owner),
        build_worker_deployment(owner, spec, config),
    ]
