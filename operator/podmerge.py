"""Merging ``spec.podTemplate.spec`` over the built worker pod spec (pure).

Lists append, maps merge, scalars replace; the names and paths the operator builds cannot be taken
over, and user tolerations add to the GPU toleration instead of replacing it.
"""

from __future__ import annotations

import copy
from typing import Any

WORKER_CONTAINER = "worker"
# Volumes the operator builds; a podTemplate volume must not reuse these names.
BUILT_VOLUMES = ("model", "cache", "tmp", "dshm")
# What a podTemplate container named "worker" may add to the built worker container.
WORKER_MERGE_KEYS = ("volumeMounts", "env", "envFrom")

Manifest = dict[str, Any]


def merge_pod_spec(pod: Manifest, override: Manifest) -> Manifest:
    """Merge ``spec.podTemplate.spec`` over the built pod spec: lists append, maps merge, scalars
    replace. A container named ``worker`` adds volumeMounts/env/envFrom to the worker container;
    other containers are added (sidecars). Names the operator builds cannot be reused."""
    out = copy.deepcopy(pod)
    for key, value in override.items():
        if key == "containers":
            _merge_containers(out, value)
        elif key == "volumes":
            taken = [v.get("name") for v in value if v.get("name") in BUILT_VOLUMES]
            if taken:
                raise ValueError(
                    f"podTemplate.spec.volumes: {', '.join(taken)} is a name of a volume the operator "
                    f"builds ({', '.join(BUILT_VOLUMES)}); rename it"
                )
            out["volumes"] = out["volumes"] + copy.deepcopy(value)
        elif key == "tolerations" and isinstance(value, list):
            out["tolerations"] = (out.get("tolerations") or []) + [
                t for t in value if t not in (out.get("tolerations") or [])
            ]
        elif isinstance(value, list) and isinstance(out.get(key), list):
            out[key] = out[key] + copy.deepcopy(value)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = {**out[key], **copy.deepcopy(value)}
        else:
            out[key] = copy.deepcopy(value)
    return out


def _merge_containers(pod: Manifest, containers: list[Manifest]) -> None:
    worker = pod["containers"][0]
    for extra in containers:
        if extra.get("name") != WORKER_CONTAINER:
            pod["containers"].append(copy.deepcopy(extra))
            continue
        unknown = sorted(set(extra) - {"name", *WORKER_MERGE_KEYS})
        if unknown:
            raise ValueError(
                f"podTemplate.spec.containers[worker] may set {', '.join(WORKER_MERGE_KEYS)} only, not "
                f"{', '.join(unknown)} (use the InferenceDeployment's engine, resources and env)"
            )
        paths = {m["mountPath"] for m in worker["volumeMounts"]}
        for mount in extra.get("volumeMounts") or []:
            if mount.get("mountPath") in paths:
                raise ValueError(
                    f"podTemplate.spec.containers[worker].volumeMounts: {mount.get('mountPath')} is "
                    "already mounted by the operator"
                )
        for key in WORKER_MERGE_KEYS:
            if extra.get(key):
                worker[key] = (worker.get(key) or []) + copy.deepcopy(extra[key])
