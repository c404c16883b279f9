"""The operator's side of tensor parallelism: engine.tensorParallelSize > 1 is accepted, the GPU count
must still match it, the worker gets the flag (parsed by the worker's own CLI into a valid engine
config) and a /dev/shm large enough for NCCL."""

from __future__ import annotations

import argparse

import pytest

from kvmesh.operator import builders, crd, workerpod
from kvmesh.operator.builders import OperatorConfig, Owner
from kvmesh.operator.spec import DeploymentSpec
from kvmesh.operator.workerpod import RedisDefaults

OWNER = Owner(name="llama70b", namespace="serving", uid="0f0e-uid")
CONFIG = OperatorConfig(worker_image="registry.example/kvmesh-worker:1.2.3", redis=RedisDefaults())


def spec(tp: int, gpus: int, **resources: object) -> DeploymentSpec:
    return DeploymentSpec.parse(
        {
            "model": {"source": "pvc://models/llama-3-70b"},
            "resources": {"gpus": gpus, **resources},
            "engine": {"tensorParallelSize": tp},
        }
    )


def dshm(s: DeploymentSpec) -> dict:
    pod = builders.build_worker_deployment(OWNER, s, CONFIG)["spec"]["template"]["spec"]
    return next(v for v in pod["volumes"] if v["name"] == "dshm")["emptyDir"]


def test_tensor_parallel_size_is_no_longer_refused_but_gpus_must_match_it() -> None:
    schema = crd.spec_schema()
    engine = schema["properties"]["engine"]
    assert "x-kubernetes-validations" not in engine
    assert engine["properties"]["tensorParallelSize"]["maximum"] == 64
    rules = [r["rule"] for r in schema["x-kubernetes-validations"]]
    assert "self.resources.gpus == 0 || self.resources.gpus == self.engine.tensorParallelSize" in rules
    crd_text = crd.crd_manifest()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    assert "tensorParallelSize == 1" not in str(crd_text)


def test_the_worker_gets_the_flag_and_its_cli_builds_a_valid_sharded_engine_config() -> None:
    from kvmesh.worker import cli as worker_cli
    from kvmesh.worker.engine.config import EngineConfig

    command = workerpod.worker_command("llama70b", "serving", spec(tp=2, gpus=2))
    assert command[command.index("--tensor-parallel-size") + 1] == "2"
    parser = argparse.ArgumentParser()
    worker_cli.configure(parser)
    config = EngineConfig(**worker_cli.engine_kwargs(parser.parse_args(command[2:])))
    config.validate()
    assert config.tensor_parallel_size == 2
    # A single-GPU worker's command is what it was, so existing deployments do not roll.
    assert "--tensor-parallel-size" not in workerpod.worker_command("llama", "serving", spec(tp=1, gpus=1))


@pytest.mark.parametrize(
    ("tp", "given", "expected"),
    [
        (1, None, "1Gi"),  # the default, untouched on one GPU
        (2, None, "2Gi"),  # raised to 1Gi per rank
        (8, "4Gi", "8Gi"),
        (4, "16Gi", "16Gi"),  # larger than the floor: kept as written
        (2, 4 * 2**30, str(4 * 2**30)),  # plain bytes
        (2, "3000M", "3000M"),  # 3 GB > 2 GiB
        (2, "1500M", "2Gi"),
    ],
)
def test_dev_shm_is_memory_backed_and_sized_for_nccl(tp: int, given: object, expected: object) -> None:
    resources = {} if given is None else {"shmSize": given}
    assert dshm(spec(tp=tp, gpus=tp, **resources)) == {"medium": "Memory", "sizeLimit": expected}


def test_quantities_parse_like_kubernetes() -> None:
    assert workerpod.quantity_bytes("1Gi") == 2**30
    assert workerpod.quantity_bytes("512Mi") == 2**29
    assert workerpod.quantity_bytes("2G") == 2 * 10**9
    assert workerpod.quantity_bytes("1.5Gi") == 3 * 2**29
    assert workerpod.quantity_bytes(1024) == 1024
    assert workerpod.quantity_bytes("lots") is None


def test_engine_config_validates_the_size() -> None:
    from kvmesh.worker.engine.config import EngineConfig

    EngineConfig(tensor_parallel_size=4).validate()
    for bad in (0, -1, 65):
        with pytest.raises(ValueError, match=r"tensor_parallel_size must be in 1\.\.64"):
            EngineConfig(tensor_parallel_size=bad).validate()
