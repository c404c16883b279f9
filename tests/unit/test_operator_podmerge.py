"""spec.podTemplate merged over the built worker pod: what users may add and what they cannot break."""

from __future__ import annotations

import pytest

from kvmesh.operator import builders
from kvmesh.operator.builders import OperatorConfig, Owner
from kvmesh.operator.spec import DeploymentSpec

OWNER = Owner(name="llama", namespace="serving", uid="uid")
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}


def build(pod_template: dict, **spec: object) -> dict:
    raw: dict = {"model": {"source": "hf://a/b"}, "podTemplate": pod_template, **spec}
    return builders.build_worker_deployment(OWNER, DeploymentSpec.parse(raw), OperatorConfig())


def test_scalars_maps_and_lists_merge_without_breaking_the_selector() -> None:
    dep = build(
        {
            "metadata": {"labels": {"team": "a", "app.kubernetes.io/instance": "hijack"}},
            "spec": {"priorityClassName": "high", "imagePullSecrets": [{"name": "reg"}]},
        }
    )
    template = dep["spec"]["template"]
    assert template["metadata"]["labels"]["team"] == "a"
    assert template["metadata"]["labels"]["app.kubernetes.io/instance"] == "llama"
    assert template["spec"]["priorityClassName"] == "high"
    assert template["spec"]["imagePullSecrets"] == [{"name": "reg"}]


def test_user_volume_mounts_reach_the_worker_container() -> None:
    dep = build(
        {
            "spec": {
                "volumes": [{"name": "adapters", "persistentVolumeClaim": {"claimName": "lora"}}],
                "containers": [
                    {
                        "name": "worker",
                        "volumeMounts": [{"name": "adapters", "mountPath": "/adapters", "readOnly": True}],
                        "envFrom": [{"secretRef": {"name": "hf"}}],
                    },
                    {"name": "sidecar", "image": "busybox:1.37"},
                ],
            }
        }
    )
    pod = dep["spec"]["template"]["spec"]
    worker = pod["containers"][0]
    assert {"name": "adapters", "mountPath": "/adapters", "readOnly": True} in worker["volumeMounts"]
    assert {"name": "cache", "mountPath": "/var/cache/kvmesh"} in worker["volumeMounts"]
    assert worker["envFrom"] == [{"secretRef": {"name": "hf"}}]
    assert [c["name"] for c in pod["containers"]] == ["worker", "sidecar"]
    assert {v["name"] for v in pod["volumes"]} == {"adapters", "cache", "tmp", "dshm"}


@pytest.mark.parametrize(
    ("pod_spec", "message"),
    [
        ({"volumes": [{"name": "cache", "emptyDir": {}}]}, "cache is a name of a volume the operator builds"),
        (
            {"containers": [{"name": "worker", "volumeMounts": [{"name": "x", "mountPath": "/dev/shm"}]}]},
            "/dev/shm is already mounted",
        ),
        ({"containers": [{"name": "worker", "image": "other:1"}]}, "not image"),
    ],
)
def test_collisions_with_what_the_operator_builds_are_clear_errors(pod_spec: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build({"spec": pod_spec})


def test_user_tolerations_keep_the_gpu_toleration() -> None:
    spot = {"key": "spot", "operator": "Exists", "effect": "NoSchedule"}
    dep = build({"spec": {"tolerations": [spot, GPU_TOLERATION]}}, resources={"gpus": 1})
    assert dep["spec"]["template"]["spec"]["tolerations"] == [GPU_TOLERATION, spot]
