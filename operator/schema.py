"""The InferenceDeployment's OpenAPI schema (spec and status), with its defaults and CEL rules.

The API server applies these defaults and rules; :func:`default_object` applies the same defaults
for the operator (``crd.apply_defaults``), so there is one source of each default.
"""

from __future__ import annotations

import copy
from typing import Any

Schema = dict[str, Any]


def _int(
    default: int | None = None, minimum: int | None = None, maximum: int | None = None, **kw: Any
) -> Schema:
    out: Schema = {"type": "integer", **kw}
    if minimum is not None:
        out["minimum"] = minimum
    if maximum is not None:
        out["maximum"] = maximum
    if default is not None:
        out["default"] = default
    return out


def _num(default: float, minimum: float, maximum: float | None = None, **kw: Any) -> Schema:
    out: Schema = {"type": "number", "minimum": minimum, "default": default, **kw}
    if maximum is not None:
        out["maximum"] = maximum
    return out


def _str(description: str, max_length: int = 253, **kw: Any) -> Schema:
    return {"type": "string", "maxLength": max_length, "description": description, **kw}


_STRING_MAP: Schema = {"type": "object", "additionalProperties": {"type": "string"}}
_FREE_LIST: Schema = {
    "type": "array",
    "items": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
}

_MODEL: Schema = {
    "type": "object",
    "description": "Where the weights come from.",
    "required": ["source"],
    "properties": {
        "source": _str(
            "hf://<org>/<repo> (downloaded by the worker), pvc://<claim>[/<path>] (a PersistentVolumeClaim "
            "mounted read-only) or hostpath://<absolute path on the node>.",
            512,
            minLength=1,
        ),
        "file": _str("A file inside the source to load, e.g. a GGUF file.", 253),
        "revision": _str("Hugging Face revision (branch, tag or commit) for hf:// sources.", 128),
        "servedName": _str("Model name announced by ListModels; defaults to the source.", 253),
    },
    "x-kubernetes-validations": [
        {
            "rule": "self.source.startsWith('hf://') || self.source.startsWith('pvc://') || "
            "self.source.startsWith('hostpath://')",
            "message": "model.source must start with hf://, pvc:// or hostpath://",
        },
        {
            "rule": "!has(self.revision) || self.source.startsWith('hf://')",
            "message": "model.revision applies to hf:// sources only",
        },
        {
            "rule": "!self.source.startsWith('hf://') || "
            "self.source.substring(5).matches('^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+$')",
            "message": "an hf:// model.source is hf://<org>/<repo>; name a file inside it with model.file",
        },
        {
            "rule": "!self.source.startsWith('hostpath://') || self.source.startsWith('hostpath:///')",
            "message": "a hostpath:// model.source must be an absolute path, e.g. hostpath:///data/models/x",
        },
    ],
}

_RESOURCES: Schema = {
    "type": "object",
    "default": {},
    "description": "What one replica (one worker pod) gets.",
    "properties": {
        "gpus": _int(1, 0, 64, description="GPUs per replica; 0 runs the worker on CPU (development)."),
        "gpuResourceName": _str("Extended resource name of the GPUs.", 253, default="nvidia.com/gpu"),
        "cpu": {"x-kubernetes-int-or-string": True, "description": "CPU request, e.g. 4 or 3500m."},
        "memory": {"x-kubernetes-int-or-string": True, "description": "Memory request and limit, e.g. 32Gi."},
        "shmSize": {
            "x-kubernetes-int-or-string": True,
            "default": "1Gi",
            "description": "Size limit of /dev/shm (memory-backed; counts against the memory limit as "
            "it fills). A tensor-parallel worker gets at least 1Gi per rank, for NCCL's buffers.",
        },
        "nodeSelector": {**_STRING_MAP, "description": "Node labels a worker pod requires."},
        "tolerations": {
            **_FREE_LIST,
            "description": "Pod tolerations (core/v1 Toleration), added to the GPU toleration.",
        },
    },
}

_ENGINE: Schema = {
    "type": "object",
    "default": {},
    "description": "Worker engine settings, passed as flags of `kvmesh worker`.",
    "properties": {
        "dtype": {"type": "string", "enum": ["auto", "float16", "bfloat16", "float32"], "default": "auto"},
        "blockSize": _int(
            16, 1, 256, description="KV-cache block size in tokens (also the prefix-hash unit)."
        ),
        "maxNumSeqs": _int(256, 1, 65536, description="Most sequences batched at once."),
        "maxNumBatchedTokens": _int(
            None,
            1,
            1048576,
            description="Token budget of a step while no stream is decoding (prompt chunks); unset: "
            "the worker's default, 2048.",
        ),
        "decodeTokenBudget": _int(
            None,
            1,
            1048576,
            description="Token budget of a step while streams are decoding: bounds the prefill work "
            "beside each decode, so inter-token latency stays even; unset: the worker's default, "
            "1024. Lower favours smooth streams, higher favours throughput and time to first token.",
        ),
        "quantization": {
            "type": "string",
            "enum": ["auto", "none", "fp8", "gptq", "awq", "gguf"],
            "description": "How the linear layers hold their weights: auto (the checkpoint's own "
            "format), none (16-bit), fp8 (W8A8; quantizes a 16-bit checkpoint at load), gptq, awq or "
            "gguf; unset: the worker's default, auto.",
        },
        "kvCacheDtype": {
            "type": "string",
            "enum": ["auto", "fp8"],
            "description": "KV cache dtype: auto (the model's) or fp8 (about twice the tokens); unset: "
            "the worker's default, auto.",
        },
        "maxModelLen": _int(4096, 16, 1048576, description="Longest context (prompt + output) in tokens."),
        "gpuMemoryUtilization": _num(0.9, 0.05, 0.99, description="Fraction of GPU memory for weights + KV."),
        "tensorParallelSize": _int(
            1,
            1,
            64,
            description="Ranks one model copy is sharded over (tensor parallelism): one process per GPU "
            "in the worker pod, or per CPU process when resources.gpus is 0. The model's attention "
            "heads and intermediate size must divide by it (the worker refuses a model that does not).",
        ),
        "speculative": {
            "type": "object",
            "default": {},
            "description": "Speculative decoding: proposals verified by the served model in one pass, "
            "outputs distributed exactly as without it.",
            "properties": {
                "method": {
                    "type": "string",
                    "enum": ["none", "ngram", "draft"],
                    "default": "none",
                    "description": "ngram: prompt lookup (copy-heavy work); draft: a smaller model "
                    "sharing the tokenizer (draftModel).",
                },
                "draftModel": _str(
                    "The draft model as `kvmesh worker --speculative-model` takes it: a path in the "
                    "worker pod (e.g. under the model volume) or hf://ORG/REPO.",
                    max_length=1024,
                ),
                "numSpeculativeTokens": _int(4, 1, 16, description="Proposals verified per step (k)."),
                "ngramMin": _int(2, 1, 16, description="Shortest suffix prompt lookup matches."),
                "ngramMax": _int(4, 1, 16, description="Longest suffix prompt lookup matches."),
                "disableBatchSize": _int(
                    32, 1, 65536, description="Running sequences above which a step does not speculate."
                ),
            },
            "x-kubernetes-validations": [
                {
                    "rule": "self.method != 'draft' || has(self.draftModel)",
                    "message": "speculative.method draft needs speculative.draftModel",
                },
                {
                    "rule": "self.method == 'draft' || !has(self.draftModel)",
                    "message": "speculative.draftModel is only read with method draft",
                },
                {
                    "rule": "self.ngramMin <= self.ngramMax",
                    "message": "speculative.ngramMin must be <= speculative.ngramMax",
                },
            ],
        },
        "extraArgs": {
            "type": "array",
            "default": [],
            "maxItems": 64,
            "items": {"type": "string", "maxLength": 1024},
            "description": "Further `kvmesh worker` arguments, appended verbatim.",
        },
    },
}

_ROUTING: Schema = {
    "type": "object",
    "default": {},
    "description": "How the gateway routes to this deployment's workers.",
    "properties": {
        "policy": {"type": "string", "enum": ["prefix", "least-load", "round-robin"], "default": "prefix"},
        "loadFactor": _num(1.25, 1.0, 100.0, description="Skip workers above loadFactor x mean load."),
    },
}

_INT_OR_STRING: Schema = {"x-kubernetes-int-or-string": True}

_CACHE: Schema = {
    "type": "object",
    "default": {},
    "description": "The worker's writable cache (hf:// downloads, GGUF conversions, compiled kernels).",
    "properties": {
        "sizeLimit": {
            **_INT_OR_STRING,
            "default": "20Gi",
            "description": "Size of the per-pod cache (emptyDir sizeLimit and ephemeral-storage request).",
        },
        "claimName": _str(
            "A PersistentVolumeClaim (ReadWriteMany) shared by the replicas instead of a per-pod "
            "emptyDir: weights are downloaded once, not by every new pod.",
            253,
        ),
    },
}

_ROLLOUT: Schema = {
    "type": "object",
    "default": {},
    "description": "How a changed spec replaces worker pods.",
    "properties": {
        "maxSurge": {
            **_INT_OR_STRING,
            "default": 1,
            "description": "Extra pods during a rollout; a surge pod needs spare GPUs. Set 0 (and "
            "maxUnavailable >= 1) on a full GPU pool.",
        },
        "maxUnavailable": {
            **_INT_OR_STRING,
            "default": 0,
            "description": "Pods that may be down during a rollout.",
        },
        "startupTimeoutSeconds": _int(
            3600,
            60,
            86400,
            description="Time a worker gets to load its model before it is restarted; the rollout's "
            "progress deadline is longer.",
        ),
    },
    "x-kubernetes-validations": [
        {
            "rule": "self.maxSurge != 0 || self.maxUnavailable != 0",
            "message": "rollout.maxSurge and rollout.maxUnavailable cannot both be 0",
        }
    ],
}


def _window(default: int, description: str) -> Schema:
    window = _int(default, 0, 3600, description=description)
    return {"type": "object", "default": {}, "properties": {"stabilizationWindowSeconds": window}}


_AUTOSCALING: Schema = {
    "type": "object",
    "default": {},
    "description": "Load-based scaling of spec.replicas from the load the workers report to Redis.",
    "properties": {
        "enabled": {"type": "boolean", "default": False},
        "minReplicas": _int(1, 1, 1000),
        "maxReplicas": _int(4, 1, 1000),
        "target": {
            "type": "object",
            "default": {},
            "properties": {
                "metric": {
                    "type": "string",
                    "enum": ["queueDepth", "kvUsage"],
                    "default": "queueDepth",
                    "description": "queueDepth: requests running + waiting per replica; "
                    "kvUsage: mean KV-cache usage (0..1).",
                },
                "value": _num(8.0, 0.01, 100000.0, description="Target value of the metric per replica."),
            },
            "x-kubernetes-validations": [
                {
                    "rule": "self.metric != 'kvUsage' || self.value <= 1.0",
                    "message": "a kvUsage target value is a fraction and must be at most 1.0",
                }
            ],
        },
        "tolerance": _num(
            0.1, 0.0, 1.0, description="No scaling while load/target is within 1 +- tolerance."
        ),
        "scaleUp": _window(0, "Scale up to the lowest recommendation of this many past seconds."),
        "scaleDown": _window(300, "Scale down to the highest recommendation of this many past seconds."),
    },
    "x-kubernetes-validations": [
        {
            "rule": "self.minReplicas <= self.maxReplicas",
            "message": "autoscaling.minReplicas must be less than or equal to autoscaling.maxReplicas",
        }
    ],
}

_SECRET_KEY_REF: Schema = {
    "type": "object",
    "required": ["name", "key"],
    "properties": {
        "name": _str("Secret name (same namespace).", 253),
        "key": _str("Key in the Secret.", 253),
    },
}

SPEC: Schema = {
    "type": "object",
    "required": ["model"],
    "properties": {
        "model": _MODEL,
        "replicas": _int(1, 0, 1000, description="Worker replicas; written by the autoscaler when enabled."),
        "image": _str("Worker image; defaults to the operator's --worker-image.", 512),
        "imagePullPolicy": {"type": "string", "enum": ["Always", "IfNotPresent", "Never"]},
        "resources": _RESOURCES,
        "engine": _ENGINE,
        "routing": _ROUTING,
        "autoscaling": _AUTOSCALING,
        "cache": _CACHE,
        "rollout": _ROLLOUT,
        "redis": {
            "type": "object",
            "description": "Redis for routing metadata and load; defaults to the operator's settings.",
            "properties": {
                "url": _str("redis:// or rediss:// URL without a password.", 1024),
                "urlSecretRef": {**_SECRET_KEY_REF, "description": "A Secret key holding the URL."},
                "passwordSecretRef": {
                    **_SECRET_KEY_REF,
                    "description": "A Secret key holding the password (reaches the worker by env).",
                },
            },
            "x-kubernetes-validations": [
                {
                    "rule": "!(has(self.url) && has(self.urlSecretRef))",
                    "message": "give redis.url or redis.urlSecretRef, not both",
                },
                {
                    "rule": "!has(self.url) || !self.url.matches('^rediss?://[^/]*@')",
                    "message": "redis.url must not carry credentials (the spec is readable by many): "
                    "put the password in a Secret and name it in redis.passwordSecretRef",
                },
            ],
        },
        "env": {**_FREE_LIST, "description": "Extra environment variables (core/v1 EnvVar) of the worker."},
        "podTemplate": {
            "type": "object",
            "description": "Overrides merged into the worker pod template.",
            "properties": {
                "metadata": {
                    "type": "object",
                    "properties": {"labels": _STRING_MAP, "annotations": _STRING_MAP},
                },
                "spec": {
                    "type": "object",
                    "x-kubernetes-preserve-unknown-fields": True,
                    "description": "core/v1 PodSpec fields (not containers) merged over the built pod spec.",
                },
            },
        },
    },
    "x-kubernetes-validations": [
        {
            "rule": "self.resources.gpus == 0 || self.resources.gpus == self.engine.tensorParallelSize",
            "message": "resources.gpus must equal engine.tensorParallelSize (or be 0 for CPU): a worker "
            "uses tensorParallelSize GPUs, more would sit idle",
        },
    ],
}


def _complete_object_defaults(schema: Schema) -> Schema:
    """Expand each ``default: {}`` of an object into its fully defaulted value.

    The API server validates a default (CEL rules included) as written, before nested defaults apply,
    so ``{}`` would fail rules that read nested fields."""
    for prop in schema.get("properties", {}).values():
        _complete_object_defaults(prop)
    if schema.get("type") == "object" and schema.get("default") == {}:
        value: dict[str, Any] = {}
        default_object(value, schema)
        schema["default"] = value
    return schema


def default_object(value: dict[str, Any], schema: Schema) -> None:
    for key, prop in schema.get("properties", {}).items():
        if key not in value and "default" in prop:
            value[key] = copy.deepcopy(prop["default"])
        if isinstance(value.get(key), dict) and prop.get("type") == "object":
            default_object(value[key], prop)


_complete_object_defaults(SPEC)
