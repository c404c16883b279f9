"""The worker pod template (pure): the `kvmesh worker` command, its env, volumes and the user's merges.

One configuration channel: everything the worker process reads travels as flags of `kvmesh worker`
(tested against its parser); env carries only secrets (the Redis URL and password, from Secrets) and
the libraries' cache locations. Certificates (the workers' TLS, the CA of a ``rediss://`` Redis) are
Secret volumes whose file paths the flags and the URL name.
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass
from typing import Any

from kvmesh.operator.podmerge import WORKER_CONTAINER, merge_pod_spec
from kvmesh.operator.spec import DeploymentSpec, SecretKeyRef

WORKER_PORT = 50051
METRICS_PORT = 9090
HTTP_PORT = 8000  # the OpenAI-compatible API
MODEL_MOUNT = "/models"
CACHE_DIR = "/var/cache/kvmesh"
RUN_AS_USER = 1000
TERMINATION_GRACE_S = 60  # the worker pod's grace period; streams drain within it
STARTUP_PERIOD_S = 10
TLS_MOUNT = "/etc/kvmesh/tls"  # a kubernetes.io/tls Secret: tls.crt, tls.key, ca.crt
REDIS_CA_MOUNT = "/etc/kvmesh/redis-ca"  # ca.crt, named by the Redis URL's ssl_ca_certs
SECRET_FILE_MODE = 0o440  # owner and fsGroup read: the worker's user is not root

Manifest = dict[str, Any]


@dataclass(slots=True, frozen=True)
class RedisDefaults:
    """The operator's Redis settings, used where an InferenceDeployment names none."""

    url: str = "redis://kvmesh-redis:6379/0"
    password_secret: SecretKeyRef | None = None
    # A Secret whose ca.crt a rediss:// URL trusts; mounted at REDIS_CA_MOUNT, which the URL names
    # (``?ssl_ca_certs=/etc/kvmesh/redis-ca/ca.crt``) as it does in the operator's own pod.
    ca_secret: str = ""


@dataclass(slots=True, frozen=True)
class WorkerTls:
    """TLS of the workers' gRPC and HTTP ports (operator-wide, from its flags)."""

    # A kubernetes.io/tls Secret (cert-manager's shape) in each InferenceDeployment's namespace:
    # tls.crt and tls.key serve; ca.crt checks client certificates under mutual TLS. Empty: plaintext.
    secret: str = ""
    client_auth: bool = False  # require client certificates ca.crt signed (the gateway presents one)

    def flags(self) -> list[str]:
        if not self.secret:
            return []
        flags = ["--tls-cert", f"{TLS_MOUNT}/tls.crt", "--tls-key", f"{TLS_MOUNT}/tls.key"]
        return flags + (["--tls-client-ca", f"{TLS_MOUNT}/ca.crt"] if self.client_auth else [])


@dataclass(slots=True, frozen=True)
class ModelLocation:
    """Where a model source resolves to inside the worker pod."""

    model_arg: str  # the value of `kvmesh worker --model`
    volume: Manifest | None  # the pod volume named "model" (None: hf:// downloads into the cache)


def resolve_model(spec: DeploymentSpec) -> ModelLocation:
    """Map ``spec.model`` to the worker's ``--model`` argument and the volume holding the weights."""
    model = spec.model
    source = model.source
    if source.startswith("hf://"):
        # hf://<org>/<repo>[@<revision>][/<file>]: the worker's loader reads all three from the flag.
        revision = f"@{model.revision}" if model.revision else ""
        return ModelLocation(source + revision + (f"/{model.file}" if model.file else ""), None)
    if source.startswith("pvc://"):
        claim, _, sub_path = source.removeprefix("pvc://").partition("/")
        path = "/".join(p for p in (MODEL_MOUNT, sub_path.strip("/"), model.file) if p)
        volume = {"name": "model", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}}
        return ModelLocation(path, volume)
    if source.startswith("hostpath://"):
        host_path = "/" + source.removeprefix("hostpath://").lstrip("/")
        path = f"{MODEL_MOUNT}/{model.file}" if model.file else MODEL_MOUNT
        return ModelLocation(path, {"name": "model", "hostPath": {"path": host_path, "type": "Directory"}})
    raise ValueError(f"unsupported model source {source!r}; use hf://, pvc:// or hostpath://")


def worker_command(
    name: str, namespace: str, spec: DeploymentSpec, tls: WorkerTls | None = None
) -> list[str]:
    """The worker container's command: the contract with `kvmesh worker`'s CLI."""
    engine = spec.engine
    return [
        "kvmesh", "worker",
        "--model", resolve_model(spec).model_arg,
        "--host", "0.0.0.0",
        "--port", str(WORKER_PORT),
        "--metrics-port", str(METRICS_PORT),
        "--http-port", str(HTTP_PORT),
        "--worker-id", "$(POD_NAME)",
        "--advertise-address", f"$(POD_IP):{WORKER_PORT}",
        # Namespaced: deployments named alike in two namespaces are two pools in Redis.
        "--deployment", f"{namespace}/{name}",
        "--dtype", engine.dtype,
        "--block-size", str(engine.block_size),
        "--max-num-seqs", str(engine.max_num_seqs),
        "--max-model-len", str(engine.max_model_len),
        "--gpu-memory-utilization", format(engine.gpu_memory_utilization, "g"),
        # Only when sharded: a flag more on every pod would roll every existing deployment.
        *(["--tensor-parallel-size", str(engine.tensor_parallel_size)]
          if engine.tensor_parallel_size > 1 else []),
        *(["--max-num-batched-tokens", str(engine.max_num_batched_tokens)]
          if engine.max_num_batched_tokens is not None else []),
        *(["--decode-token-budget", str(engine.decode_token_budget)]
          if engine.decode_token_budget is not None else []),
        *(["--quantization", engine.quantization] if engine.quantization is not None else []),
        *(["--kv-cache-dtype", engine.kv_cache_dtype] if engine.kv_cache_dtype is not None else []),
        *engine.speculative.worker_args(),  # none while speculation is off, likewise
        # In-flight streams get the pod's grace period, less time to exit before SIGKILL.
        "--shutdown-grace", str(TERMINATION_GRACE_S - 5),
        *(["--served-model-name", spec.model.served_name] if spec.model.served_name else []),
        *(tls or WorkerTls()).flags(),
        *engine.extra_args,
    ]  # fmt: skip


def _secret_env(name: str, ref: SecretKeyRef) -> Manifest:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}}


def worker_env(spec: DeploymentSpec, redis: RedisDefaults) -> list[Manifest]:
    """Env of the worker: pod identity for the flags, Redis (the CLI reads KVMESH_REDIS_URL and the
    store KVMESH_REDIS_PASSWORD, so neither shows in the process's argv) and the cache locations."""
    env: list[Manifest] = [
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
    ]
    own = spec.redis
    if own.url_secret:
        env.append(_secret_env("KVMESH_REDIS_URL", own.url_secret))
    else:
        env.append({"name": "KVMESH_REDIS_URL", "value": own.url or redis.url})
    password = own.password_secret or (None if own.url or own.url_secret else redis.password_secret)
    if password:
        env.append(_secret_env("KVMESH_REDIS_PASSWORD", password))
    # The root filesystem is read-only: every cache a worker writes lives on the cache volume.
    env += [
        {"name": "HF_HOME", "value": f"{CACHE_DIR}/huggingface"},
        {"name": "KVMESH_CACHE", "value": f"{CACHE_DIR}/kvmesh"},
        {"name": "XDG_CACHE_HOME", "value": CACHE_DIR},
        {"name": "TRITON_CACHE_DIR", "value": f"{CACHE_DIR}/triton"},
        {"name": "TRITON_HOME", "value": CACHE_DIR},
    ]
    overridden = {e.get("name") for e in spec.env}
    return [e for e in env if e["name"] not in overridden] + copy.deepcopy(spec.env)


# The worker's health service: "" turns SERVING once the model is loaded and the worker is registered in
# Redis (readiness: route to it); kvmesh.v1.Worker once the model is loaded (startup and liveness: a
# worker that cannot reach Redis is left running, not restarted).
LOADED_SERVICE = "kvmesh.v1.Worker"


def _grpc_probe(period: int, failures: int, timeout: int = 5, service: str = "") -> Manifest:
    return {
        "grpc": {"port": WORKER_PORT, **({"service": service} if service else {})},
        "periodSeconds": period,
        "failureThreshold": failures,
        "timeoutSeconds": timeout,
    }


def _https_probe(path: str, period: int, failures: int, timeout: int = 5) -> Manifest:
    """Under TLS the kubelet cannot make gRPC probes (it dials them in plaintext); the HTTP port's
    /health (loaded, as kvmesh.v1.Worker) and /ready (also registered, as "") answer the same
    questions over HTTPS, without a client certificate even under mutual TLS."""
    return {
        "httpGet": {"path": path, "port": HTTP_PORT, "scheme": "HTTPS"},
        "periodSeconds": period,
        "failureThreshold": failures,
        "timeoutSeconds": timeout,
    }


def _probes(spec: DeploymentSpec, tls: WorkerTls) -> Manifest:
    """Loading weights can take long: the startup probe allows rollout.startupTimeoutSeconds, then
    liveness takes over."""
    startup = startup_failures(spec)
    if tls.secret:
        return {
            "startupProbe": _https_probe("/health", STARTUP_PERIOD_S, startup),
            "readinessProbe": _https_probe("/ready", period=5, failures=3),
            "livenessProbe": _https_probe("/health", period=10, failures=6),
        }
    return {
        "startupProbe": _grpc_probe(STARTUP_PERIOD_S, startup, service=LOADED_SERVICE),
        "readinessProbe": _grpc_probe(period=5, failures=3),
        "livenessProbe": _grpc_probe(period=10, failures=6, service=LOADED_SERVICE),
    }


def startup_failures(spec: DeploymentSpec) -> int:
    return math.ceil(spec.rollout.startup_timeout_s / STARTUP_PERIOD_S)


def _resources(spec: DeploymentSpec) -> Manifest:
    res = spec.resources
    requests: dict[str, Any] = {}
    limits: dict[str, Any] = {}
    if res.cpu is not None:
        requests["cpu"] = res.cpu
    if res.memory is not None:
        requests["memory"] = limits["memory"] = res.memory
    if spec.cache.claim_name is None:
        requests["ephemeral-storage"] = spec.cache.size_limit  # the cache emptyDir's budget
    if res.gpus > 0:
        # Extended resources: request must equal limit.
        requests[res.gpu_resource_name] = limits[res.gpu_resource_name] = str(res.gpus)
    return {k: v for k, v in (("requests", requests), ("limits", limits)) if v}


def _secret_volume(name: str, secret: str, items: list[str] | None = None) -> Manifest:
    source: Manifest = {"secretName": secret, "defaultMode": SECRET_FILE_MODE}
    if items:
        source["items"] = [{"key": key, "path": key} for key in items]
    return {"name": name, "secret": source}


def _volumes(
    spec: DeploymentSpec, location: ModelLocation, tls: WorkerTls, redis: RedisDefaults
) -> tuple[list[Manifest], list[Manifest]]:
    """(pod volumes, worker volume mounts)."""
    if spec.cache.claim_name:
        cache: Manifest = {"name": "cache", "persistentVolumeClaim": {"claimName": spec.cache.claim_name}}
    else:
        cache = {"name": "cache", "emptyDir": {"sizeLimit": spec.cache.size_limit}}
    volumes = [
        cache,
        {"name": "tmp", "emptyDir": {"sizeLimit": "1Gi"}},
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": shm_size(spec)}},
    ]
    mounts = [
        {"name": "cache", "mountPath": CACHE_DIR},
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": "dshm", "mountPath": "/dev/shm"},
    ]
    if location.volume is not None:
        volumes.insert(0, location.volume)
        mounts.insert(0, {"name": "model", "mountPath": MODEL_MOUNT, "readOnly": True})
    if tls.secret:
        volumes.append(_secret_volume("tls", tls.secret))
        mounts.append({"name": "tls", "mountPath": TLS_MOUNT, "readOnly": True})
    if redis.ca_secret and not (spec.redis.url or spec.redis.url_secret):  # only the default URL names it
        volumes.append(_secret_volume("redis-ca", redis.ca_secret, ["ca.crt"]))
        mounts.append({"name": "redis-ca", "mountPath": REDIS_CA_MOUNT, "readOnly": True})
    return volumes, mounts


# /dev/shm a tensor-parallel worker gets at least, per rank: NCCL keeps its shared-memory transport
# and proxy buffers there (a container runtime's 64Mi default makes NCCL fail at its first collective).
TP_SHM_PER_RANK = 1 << 30
_QUANTITY = re.compile(r"(\d+(?:\.\d+)?)(Ki|Mi|Gi|Ti|Pi|k|M|G|T|P)?")
_UNITS = {None: 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15}
_UNITS.update({"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40, "Pi": 1 << 50})


def quantity_bytes(value: str | int) -> int | None:
    """A Kubernetes memory quantity (``1Gi``, ``512M``, ``1073741824``) in bytes; None if unparsed."""
    match = _QUANTITY.fullmatch(str(value).strip())
    if match is None:
        return None
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def shm_size(spec: DeploymentSpec) -> str | int:
    """``resources.shmSize``, raised to TP_SHM_PER_RANK per rank for a tensor-parallel worker."""
    given, ranks = spec.resources.shm_size, spec.engine.tensor_parallel_size
    floor = TP_SHM_PER_RANK * ranks
    if ranks > 1 and (quantity_bytes(given) or 0) < floor:
        return f"{floor >> 30}Gi"
    return given


def _tolerations(spec: DeploymentSpec) -> list[Manifest]:
    res = spec.resources
    out: list[Manifest] = []
    if res.gpus > 0:
        out.append({"key": res.gpu_taint_key, "operator": "Exists", "effect": "NoSchedule"})
    return out + [t for t in res.tolerations if t not in out]


def build_worker_pod_spec(
    spec: DeploymentSpec,
    container: Manifest,
    location: ModelLocation,
    tls: WorkerTls | None = None,
    redis: RedisDefaults | None = None,
) -> Manifest:
    volumes, mounts = _volumes(spec, location, tls or WorkerTls(), redis or RedisDefaults())
    container["volumeMounts"] = mounts
    pod: Manifest = {
        "containers": [container],
        "enableServiceLinks": False,
        "automountServiceAccountToken": False,  # workers never talk to the Kubernetes API
        "terminationGracePeriodSeconds": TERMINATION_GRACE_S,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUN_AS_USER,
            "runAsGroup": RUN_AS_USER,
            "fsGroup": RUN_AS_USER,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumes": volumes,
    }
    if spec.resources.node_selector:
        pod["nodeSelector"] = dict(spec.resources.node_selector)
    if tolerations := _tolerations(spec):
        pod["tolerations"] = tolerations
    override = (spec.pod_template.get("spec") or {}) if spec.pod_template else {}
    return merge_pod_spec(pod, override) if override else pod


def worker_container(
    name: str,
    namespace: str,
    spec: DeploymentSpec,
    image: str,
    pull: str,
    redis: RedisDefaults,
    tls: WorkerTls | None = None,
) -> Manifest:
    tls = tls or WorkerTls()
    return {
        "name": WORKER_CONTAINER,
        "image": image,
        "imagePullPolicy": pull,
        "command": worker_command(name, namespace, spec, tls),
        "env": worker_env(spec, redis),
        "ports": [
            {"name": "grpc", "containerPort": WORKER_PORT, "protocol": "TCP"},
            {"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"},
            {"name": "http", "containerPort": HTTP_PORT, "protocol": "TCP"},
        ],
        "resources": _resources(spec),
        **_probes(spec, tls),
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
        },
    }
