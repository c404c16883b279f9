"""An InferenceDeployment's spec as one typed, fully defaulted object.

Each reconcile pass parses ``body.spec`` once (:meth:`DeploymentSpec.parse`): the CRD's defaults are
applied there and only there (``crd.apply_defaults``), and every builder reads the typed fields.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kvmesh.operator import crd
from kvmesh.operator.autoscaler import AutoscalingPolicy

Manifest = dict[str, Any]


@dataclass(slots=True, frozen=True)
class ModelSpec:
    source: str
    file: str | None
    revision: str | None
    served_name: str | None

    @property
    def scheme(self) -> str:
        return self.source.partition("://")[0]


@dataclass(slots=True, frozen=True)
class ResourcesSpec:
    gpus: int
    gpu_resource_name: str
    cpu: str | None
    memory: str | None
    shm_size: str
    node_selector: dict[str, str]
    tolerations: list[Manifest]

    @property
    def gpu_taint_key(self) -> str:
        """The taint GPU nodes carry. NVIDIA's device plugin and GPU operator taint every GPU node
        ``nvidia.com/gpu``, MIG slices (``nvidia.com/mig-1g.10gb``) included; other vendors taint with
        the resource name itself."""
        if self.gpu_resource_name.startswith("nvidia.com/"):
            return "nvidia.com/gpu"
        return self.gpu_resource_name


@dataclass(slots=True, frozen=True)
class SpeculativeSpec:
    method: str  # none | ngram | draft
    draft_model: str | None
    num_speculative_tokens: int
    ngram_min: int
    ngram_max: int
    disable_batch_size: int

    @classmethod
    def parse(cls, raw: Manifest) -> SpeculativeSpec:
        return cls(
            raw["method"],
            raw.get("draftModel"),
            int(raw["numSpeculativeTokens"]),
            int(raw["ngramMin"]),
            int(raw["ngramMax"]),
            int(raw["disableBatchSize"]),
        )

    def worker_args(self) -> list[str]:
        """The `kvmesh worker` flags (none when speculation is off)."""
        if self.method == "none":
            return []
        args = ["--speculative", self.method]
        if self.method == "draft" and self.draft_model:
            args += ["--speculative-model", self.draft_model]
        if self.method == "ngram":
            args += ["--ngram-prompt-lookup-min", str(self.ngram_min)]
            args += ["--ngram-prompt-lookup-max", str(self.ngram_max)]
        return [
            *args,
            "--num-speculative-tokens", str(self.num_speculative_tokens),
            "--speculative-disable-batch-size", str(self.disable_batch_size),
        ]  # fmt: skip


def _optional_int(value: Any) -> int | None:
    return None if value is None else int(value)


@dataclass(slots=True, frozen=True)
class EngineSpec:
    dtype: str
    block_size: int
    max_num_seqs: int
    max_model_len: int
    max_num_batched_tokens: int | None
    decode_token_budget: int | None
    quantization: str | None
    kv_cache_dtype: str | None
    gpu_memory_utilization: float
    tensor_parallel_size: int
    extra_args: list[str]
    speculative: SpeculativeSpec


@dataclass(slots=True, frozen=True)
class RoutingSpec:
    policy: str
    load_factor: float


@dataclass(slots=True, frozen=True)
class CacheSpec:
    """The worker's writable cache volume: hf:// downloads, GGUF conversions, compiled kernels."""

    size_limit: str  # emptyDir sizeLimit, and the pod's ephemeral-storage request
    claim_name: str | None  # a shared PersistentVolumeClaim instead of an emptyDir


@dataclass(slots=True, frozen=True)
class RolloutSpec:
    max_surge: int | str
    max_unavailable: int | str
    startup_timeout_s: int


@dataclass(slots=True, frozen=True)
class SecretKeyRef:
    name: str
    key: str

    @classmethod
    def parse(cls, raw: Manifest | None) -> SecretKeyRef | None:
        return cls(raw["name"], raw["key"]) if raw else None


@dataclass(slots=True, frozen=True)
class RedisSpec:
    url: str | None
    url_secret: SecretKeyRef | None
    password_secret: SecretKeyRef | None


@dataclass(slots=True, frozen=True)
class DeploymentSpec:
    model: ModelSpec
    replicas: int
    image: str | None
    image_pull_policy: str | None
    resources: ResourcesSpec
    engine: EngineSpec
    routing: RoutingSpec
    autoscaling_enabled: bool
    autoscaling: AutoscalingPolicy
    cache: CacheSpec
    rollout: RolloutSpec
    redis: RedisSpec
    env: list[Manifest]
    pod_template: Manifest

    @classmethod
    def parse(cls, raw: Manifest) -> DeploymentSpec:
        """Typed spec from ``body.spec`` (defaults applied here, once)."""
        s = crd.apply_defaults(dict(raw))
        model, res, engine, routing = s["model"], s["resources"], s["engine"], s["routing"]
        cache, rollout, redis = s["cache"], s["rollout"], s.get("redis") or {}
        return cls(
            model=ModelSpec(
                model["source"], model.get("file"), model.get("revision"), model.get("servedName")
            ),
            replicas=int(s["replicas"]),
            image=s.get("image"),
            image_pull_policy=s.get("imagePullPolicy"),
            resources=ResourcesSpec(
                gpus=int(res["gpus"]),
                gpu_resource_name=res["gpuResourceName"],
                cpu=_quantity(res.get("cpu")),
                memory=_quantity(res.get("memory")),
                shm_size=str(res["shmSize"]),
                node_selector=dict(res.get("nodeSelector") or {}),
                tolerations=[dict(t) for t in res.get("tolerations") or []],
            ),
            engine=EngineSpec(
                dtype=engine["dtype"],
                block_size=int(engine["blockSize"]),
                max_num_seqs=int(engine["maxNumSeqs"]),
                max_model_len=int(engine["maxModelLen"]),
                max_num_batched_tokens=_optional_int(engine.get("maxNumBatchedTokens")),
                decode_token_budget=_optional_int(engine.get("decodeTokenBudget")),
                quantization=engine.get("quantization"),
                kv_cache_dtype=engine.get("kvCacheDtype"),
                gpu_memory_utilization=float(engine["gpuMemoryUtilization"]),
                tensor_parallel_size=int(engine["tensorParallelSize"]),
                extra_args=list(engine["extraArgs"]),
                speculative=SpeculativeSpec.parse(engine["speculative"]),
            ),
            routing=RoutingSpec(routing["policy"], float(routing["loadFactor"])),
            autoscaling_enabled=bool(s["autoscaling"]["enabled"]),
            autoscaling=AutoscalingPolicy.from_spec(s["autoscaling"]),
            cache=CacheSpec(str(cache["sizeLimit"]), cache.get("claimName")),
            rollout=RolloutSpec(
                rollout["maxSurge"], rollout["maxUnavailable"], int(rollout["startupTimeoutSeconds"])
            ),
            redis=RedisSpec(
                redis.get("url"),
                SecretKeyRef.parse(redis.get("urlSecretRef")),
                SecretKeyRef.parse(redis.get("passwordSecretRef")),
            ),
            env=[dict(e) for e in s.get("env") or []],
            pod_template=dict(s.get("podTemplate") or {}),
        )


def _quantity(value: Any) -> str | None:
    return None if value is None else str(value)
