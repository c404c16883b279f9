"""The operator's pure builders: the worker Deployment and its pod, the headless Service and the PDB,
and the worker CLI contract of the command they write."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import yaml

from kvmesh.operator import builders, workerpod
from kvmesh.operator.builders import OperatorConfig, Owner
from kvmesh.operator.spec import DeploymentSpec, SecretKeyRef
from kvmesh.operator.workerpod import RedisDefaults

REPO = Path(__file__).resolve().parents[2]
OWNER = Owner(name="llama", namespace="serving", uid="0f0e-uid")
CONFIG = OperatorConfig(
    worker_image="registry.example/kvmesh-worker:1.2.3", redis=RedisDefaults(url="redis://r:6379/0")
)


def spec(**overrides: object) -> DeploymentSpec:
    out: dict = {"model": {"source": "hf://HuggingFaceTB/SmolLM2-135M-Instruct"}}
    out.update(overrides)
    return DeploymentSpec.parse(out)


def deployment(s: DeploymentSpec | None = None, config: OperatorConfig = CONFIG) -> dict:
    return builders.build_worker_deployment(OWNER, s or spec(), config)


def pod(dep: dict) -> dict:
    return dep["spec"]["template"]["spec"]


def worker(dep: dict) -> dict:
    return pod(dep)["containers"][0]


def env_of(container: dict) -> dict:
    return {e["name"]: e for e in container["env"]}


def flag(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def test_worker_command_is_the_worker_cli_contract() -> None:
    s = spec(engine={"extraArgs": ["--enforce-eager"], "gpuMemoryUtilization": 0.85})
    assert workerpod.worker_command("llama", "serving", s) == [
        "kvmesh", "worker",
        "--model", "hf://HuggingFaceTB/SmolLM2-135M-Instruct",
        "--host", "0.0.0.0",
        "--port", "50051",
        "--metrics-port", "9090",
        "--http-port", "8000",
        "--worker-id", "$(POD_NAME)",
        "--advertise-address", "$(POD_IP):50051",
        "--deployment", "serving/llama",
        "--dtype", "auto",
        "--block-size", "16",
        "--max-num-seqs", "256",
        "--max-model-len", "4096",
        "--gpu-memory-utilization", "0.85",
        "--shutdown-grace", "55",
        "--enforce-eager",
    ]  # fmt: skip


def test_worker_command_parses_with_the_worker_cli_for_every_sample() -> None:
    from kvmesh.worker import cli as worker_cli

    parser = argparse.ArgumentParser()
    worker_cli.configure(parser)
    args = parser.parse_args(
        workerpod.worker_command("llama", "serving", spec(model={"source": "pvc://w/m"}))[2:]
    )
    assert (args.model, args.port, args.deployment, args.block_size) == (
        "/models/m",
        50051,
        "serving/llama",
        16,
    )
    for path in sorted((REPO / "deploy" / "samples").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            command = workerpod.worker_command(
                doc["metadata"]["name"], "ns", DeploymentSpec.parse(doc["spec"])
            )
            parser.parse_args(command[2:])


def test_no_secret_and_no_unread_setting_travels_in_env_or_argv() -> None:
    """Flags are the one channel; env carries pod identity, Redis and cache locations only."""
    s = spec(model={"source": "hf://a/b", "revision": "v2", "file": "q4.gguf", "servedName": "m"})
    container = worker(deployment(s))
    assert set(env_of(container)) == {
        "POD_NAME", "POD_IP", "KVMESH_REDIS_URL",
        "HF_HOME", "KVMESH_CACHE", "XDG_CACHE_HOME", "TRITON_CACHE_DIR", "TRITON_HOME",
    }  # fmt: skip
    assert not any("redis" in part.lower() for part in container["command"])
    assert flag(container["command"], "--model") == "hf://a/b@v2/q4.gguf"
    assert flag(container["command"], "--served-model-name") == "m"
    assert not [v for v in pod(deployment(s))["volumes"] if "configMap" in v]
    assert [c["kind"] for c in builders.build_children(OWNER, s, CONFIG)] == [
        "Service", "PodDisruptionBudget", "Deployment",
    ]  # fmt: skip


def test_redis_password_comes_from_a_secret_by_env() -> None:
    with_secret = OperatorConfig(
        redis=RedisDefaults("redis://r:6379/0", SecretKeyRef("kvmesh-redis", "password"))
    )
    env = env_of(worker(deployment(config=with_secret)))
    assert env["KVMESH_REDIS_URL"] == {"name": "KVMESH_REDIS_URL", "value": "redis://r:6379/0"}
    assert env["KVMESH_REDIS_PASSWORD"]["valueFrom"] == {
        "secretKeyRef": {"name": "kvmesh-redis", "key": "password"}
    }
    # An InferenceDeployment's own Redis does not get the operator's password.
    own = spec(redis={"url": "redis://mine:6379/0"})
    assert "KVMESH_REDIS_PASSWORD" not in env_of(worker(deployment(own, with_secret)))
    own = spec(
        redis={"urlSecretRef": {"name": "u", "key": "url"}, "passwordSecretRef": {"name": "p", "key": "k"}}
    )
    env = env_of(worker(deployment(own, with_secret)))
    assert env["KVMESH_REDIS_URL"]["valueFrom"]["secretKeyRef"] == {"name": "u", "key": "url"}
    assert env["KVMESH_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "p", "key": "k"}


def test_user_env_overrides_builtin_env() -> None:
    s = spec(
        env=[{"name": "KVMESH_REDIS_URL", "value": "redis://other:1/0"}, {"name": "HF_TOKEN", "value": "t"}]
    )
    env = worker(deployment(s))["env"]
    assert [e for e in env if e["name"] == "KVMESH_REDIS_URL"] == [
        {"name": "KVMESH_REDIS_URL", "value": "redis://other:1/0"}
    ]
    assert {"name": "HF_TOKEN", "value": "t"} in env


CACHE_ENV = ("KVMESH_CACHE", "HF_HOME", "XDG_CACHE_HOME", "TRITON_CACHE_DIR", "TRITON_HOME")


@pytest.mark.parametrize("source", ["hf://a/b", "hostpath:///data/smol", "pvc://weights/m"])
def test_every_cache_lives_on_a_writable_volume(source: str) -> None:
    """The root filesystem is read-only, so a cache outside a writable mount crashes the worker."""
    container = worker(deployment(spec(model={"source": source})))
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    writable = [m["mountPath"] for m in container["volumeMounts"] if not m.get("readOnly")]
    for name in CACHE_ENV:
        path = env_of(container)[name]["value"]
        assert any(path == m or path.startswith(m + "/") for m in writable), (name, path, writable)


CLAIM = {"persistentVolumeClaim": {"claimName": "weights", "readOnly": True}}
SOURCES = [
    ({"source": "hf://Qwen/Qwen2-0.5B"}, None, "hf://Qwen/Qwen2-0.5B"),
    ({"source": "pvc://weights/llama/8b"}, CLAIM, "/models/llama/8b"),
    ({"source": "pvc://weights", "file": "m.gguf"}, CLAIM, "/models/m.gguf"),
    (
        {"source": "hostpath:///data/smol", "file": "S.gguf"},
        {"hostPath": {"path": "/data/smol", "type": "Directory"}},
        "/models/S.gguf",
    ),
]


@pytest.mark.parametrize(("model", "volume", "model_arg"), SOURCES)
def test_model_sources_mount_and_point_the_worker(model: dict, volume: dict | None, model_arg: str) -> None:
    dep = deployment(spec(model=model))
    models = [
        {k: v for k, v in vol.items() if k != "name"} for vol in pod(dep)["volumes"] if vol["name"] == "model"
    ]
    assert models == ([volume] if volume else [])  # hf:// downloads into the cache volume instead
    assert flag(worker(dep)["command"], "--model") == model_arg


def test_hf_weights_go_to_a_bounded_cache_or_a_shared_claim() -> None:
    dep = deployment(spec(cache={"sizeLimit": "40Gi"}))
    cache = next(v for v in pod(dep)["volumes"] if v["name"] == "cache")
    assert cache == {"name": "cache", "emptyDir": {"sizeLimit": "40Gi"}}
    assert worker(dep)["resources"]["requests"]["ephemeral-storage"] == "40Gi"
    assert env_of(worker(dep))["HF_HOME"]["value"] == "/var/cache/kvmesh/huggingface"
    shared = deployment(spec(cache={"claimName": "model-cache"}))
    cache = next(v for v in pod(shared)["volumes"] if v["name"] == "cache")
    assert cache == {"name": "cache", "persistentVolumeClaim": {"claimName": "model-cache"}}
    assert "ephemeral-storage" not in worker(shared)["resources"].get("requests", {})


def test_shm_has_a_size_limit() -> None:
    dshm = next(
        v for v in pod(deployment(spec(resources={"shmSize": "4Gi"})))["volumes"] if v["name"] == "dshm"
    )
    assert dshm["emptyDir"] == {"medium": "Memory", "sizeLimit": "4Gi"}


def test_gpus_are_requested_and_the_gpu_taint_tolerated_next_to_user_tolerations() -> None:
    user = {"key": "dedicated", "operator": "Equal", "value": "llm", "effect": "NoSchedule"}
    dep = deployment(spec(resources={"gpus": 1, "cpu": 8, "memory": "64Gi", "tolerations": [user]}))
    res = worker(dep)["resources"]
    assert res["limits"]["nvidia.com/gpu"] == "1" and res["requests"]["nvidia.com/gpu"] == "1"
    assert res["requests"]["cpu"] == "8" and res["limits"]["memory"] == "64Gi"
    gpu = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    assert pod(dep)["tolerations"] == [gpu, user]
    mig = deployment(spec(resources={"gpus": 1, "gpuResourceName": "nvidia.com/mig-1g.10gb"}))
    assert worker(mig)["resources"]["limits"] == {"nvidia.com/mig-1g.10gb": "1"}
    assert pod(mig)["tolerations"] == [gpu]


def test_cpu_worker_requests_no_gpu() -> None:
    dep = deployment(spec(resources={"gpus": 0}))
    assert "nvidia.com/gpu" not in str(worker(dep)["resources"])
    assert "tolerations" not in pod(dep)


def test_rollout_strategy_and_deadline_follow_the_spec() -> None:
    dep = deployment(spec(rollout={"maxSurge": 0, "maxUnavailable": 1, "startupTimeoutSeconds": 7200}))
    assert dep["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 0, "maxUnavailable": 1}
    startup = worker(dep)["startupProbe"]
    budget = startup["periodSeconds"] * startup["failureThreshold"]
    assert budget >= 7200
    # A slow but healthy model load must not read as a stalled rollout.
    assert dep["spec"]["progressDeadlineSeconds"] > budget
    default = deployment()
    startup = worker(default)["startupProbe"]
    assert default["spec"]["progressDeadlineSeconds"] > startup["periodSeconds"] * startup["failureThreshold"]


def test_probes_use_grpc_health_on_the_worker_port() -> None:
    container = worker(deployment())
    # Ready once registered in Redis; started and alive once the model is loaded, so a worker that cannot
    # reach Redis is taken out of rotation, not restarted.
    assert container["readinessProbe"]["grpc"] == {"port": 50051}
    for probe in ("startupProbe", "livenessProbe"):
        assert container[probe]["grpc"] == {"port": 50051, "service": "kvmesh.v1.Worker"}


def test_runs_as_non_root_with_a_read_only_root_filesystem() -> None:
    dep = deployment()
    assert (
        pod(dep)["securityContext"]["runAsNonRoot"] is True
        and pod(dep)["securityContext"]["runAsUser"] == 1000
    )
    sc = worker(dep)["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert {m["mountPath"] for m in worker(dep)["volumeMounts"]} == {"/tmp", "/var/cache/kvmesh", "/dev/shm"}


def test_spec_changes_roll_workers_only_when_the_worker_changes() -> None:
    base = deployment()["spec"]["template"]
    assert deployment(spec(engine={"maxNumSeqs": 64}))["spec"]["template"] != base
    # Routing is the gateways' business, replicas are not configuration: neither restarts workers.
    assert deployment(spec(routing={"policy": "least-load"}))["spec"]["template"] == base
    scaled = deployment(spec(replicas=5))
    assert scaled["spec"]["template"] == base and scaled["spec"]["replicas"] == 5


def test_image_defaults_to_operator_and_can_be_overridden() -> None:
    assert worker(deployment())["image"] == CONFIG.worker_image
    assert worker(deployment(spec(image="mine:1")))["image"] == "mine:1"


def test_every_child_is_owned_by_the_inference_deployment() -> None:
    for child in builders.build_children(OWNER, spec(), CONFIG):
        meta = child["metadata"]
        assert meta["namespace"] == "serving"
        assert meta["ownerReferences"] == [
            {
                "apiVersion": "kvmesh.io/v1alpha1",
                "kind": "InferenceDeployment",
                "name": "llama",
                "uid": "0f0e-uid",
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]
        assert meta["labels"]["app.kubernetes.io/managed-by"] == "kvmesh-operator"
        assert meta["labels"]["kvmesh.io/deployment"] == "llama"  # what the children's watch selects


def test_headless_service_selects_the_workers() -> None:
    svc = builders.build_service(OWNER)
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["selector"] == builders.selector_labels("llama")
    dep = deployment()
    assert dep["spec"]["selector"]["matchLabels"] == svc["spec"]["selector"]
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert all(labels[k] == v for k, v in svc["spec"]["selector"].items())


def test_workers_serve_grpc_and_the_openai_api_on_named_ports() -> None:
    container = worker(deployment())
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": 50051, "metrics": 9090, "http": 8000}
    assert flag(container["command"], "--http-port") == "8000"
    svc_ports = {p["name"]: p["targetPort"] for p in builders.build_service(OWNER)["spec"]["ports"]}
    assert svc_ports == {"grpc": "grpc", "metrics": "metrics", "http": "http"}


def test_pdb_allows_one_voluntary_disruption() -> None:
    pdb = builders.build_pdb(OWNER)
    assert pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"] == builders.selector_labels("llama")


def test_selector_string_matches_the_labels() -> None:
    assert (
        builders.selector_string("llama")
        == "app.kubernetes.io/instance=llama,app.kubernetes.io/name=kvmesh-worker"
    )


def test_the_worker_loader_reads_repo_revision_and_file_from_the_model_flag() -> None:
    """model.revision and model.file reach the loader through --model alone (no env side channel)."""
    from kvmesh.worker.model import loader

    s = spec(model={"source": "hf://bartowski/Qwen2.5-7B-GGUF", "revision": "main", "file": "q4_k_m.gguf"})
    arg = flag(workerpod.worker_command("q", "ns", s), "--model")
    source = loader.locate_model(arg)
    assert (source.kind, source.name) == ("hub", "bartowski/Qwen2.5-7B-GGUF")
    assert loader.hub_parts(source.location) == ("bartowski/Qwen2.5-7B-GGUF", "main", "q4_k_m.gguf")
    assert "KVMESH_MODEL" not in (REPO / "worker" / "model" / "loader.py").read_text()
