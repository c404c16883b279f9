"""The operator's pure parts: CRD generation and defaulting, child builders, status conditions."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from kvmesh.operator import builders, crd, status
from kvmesh.operator.builders import OperatorConfig, Owner

REPO = Path(__file__).resolve().parents[2]
CRD_FILE = REPO / "deploy" / "helm" / "kvmesh" / "crds" / "inferencedeployments.kvmesh.io.yaml"
OWNER = Owner(name="llama", namespace="serving", uid="0f0e-uid")
CONFIG = OperatorConfig(worker_image="registry.example/kvmesh-worker:1.2.3", redis_url="redis://r:6379/0")


def spec(**overrides: object) -> dict:
    out: dict = {"model": {"source": "hf://HuggingFaceTB/SmolLM2-135M-Instruct"}}
    out.update(overrides)
    return out


def worker(deployment: dict) -> dict:
    return deployment["spec"]["template"]["spec"]["containers"][0]


def env_of(container: dict) -> dict:
    return {e["name"]: e for e in container["env"]}


# ---- CRD -----------------------------------------------------------------------------------------


def test_chart_crd_is_generated_from_the_python_schema() -> None:
    on_disk = yaml.safe_load(CRD_FILE.read_text())
    assert on_disk == crd.crd_manifest(), (
        "stale CRD: run `python -m kvmesh.operator.crd > " + str(CRD_FILE) + "`"
    )


def test_crd_has_scale_and_status_subresources_and_printer_columns() -> None:
    version = crd.crd_manifest()["spec"]["versions"][0]
    assert version["subresources"]["status"] == {}
    assert version["subresources"]["scale"] == {
        "specReplicasPath": ".spec.replicas",
        "statusReplicasPath": ".status.replicas",
        "labelSelectorPath": ".status.selector",
    }
    columns = [c["name"] for c in version["additionalPrinterColumns"] if not c.get("priority")]
    assert columns == ["Model", "Ready", "Desired", "Age"]


def test_defaults_fill_nested_objects_like_the_api_server() -> None:
    out = crd.apply_defaults(spec())
    assert out["replicas"] == 1
    assert out["engine"] == {
        "dtype": "auto",
        "blockSize": 16,
        "maxNumSeqs": 256,
        "maxModelLen": 4096,
        "gpuMemoryUtilization": 0.9,
        "tensorParallelSize": 1,
        "extraArgs": [],
    }
    assert out["autoscaling"]["target"] == {"metric": "queueDepth", "value": 8.0}
    assert out["autoscaling"]["scaleDown"] == {"stabilizationWindowSeconds": 300}
    assert "blockSize" not in out["routing"]  # defaults to engine.blockSize, resolved by the builders


def test_defaults_keep_given_values_and_do_not_mutate_input() -> None:
    given = spec(engine={"blockSize": 32}, replicas=3)
    out = crd.apply_defaults(given)
    assert out["engine"]["blockSize"] == 32 and out["engine"]["maxNumSeqs"] == 256
    assert out["replicas"] == 3
    assert given == spec(engine={"blockSize": 32}, replicas=3)


def test_cel_rules_cover_the_cross_field_checks() -> None:
    rules = " ".join(r["rule"] for r in crd.spec_schema()["x-kubernetes-validations"])
    assert "tensorParallelSize" in rules and "gpus" in rules
    autoscaling = crd.spec_schema()["properties"]["autoscaling"]
    assert "self.minReplicas <= self.maxReplicas" in autoscaling["x-kubernetes-validations"][0]["rule"]
    assert crd.spec_schema()["required"] == ["model"]


# ---- worker Deployment ---------------------------------------------------------------------------


def test_worker_command_is_the_worker_cli_contract() -> None:
    s = spec(engine={"extraArgs": ["--enable-prefix-caching"], "gpuMemoryUtilization": 0.85})
    assert builders.worker_command("llama", s) == [
        "kvmesh", "worker",
        "--model", "HuggingFaceTB/SmolLM2-135M-Instruct",
        "--host", "0.0.0.0",
        "--port", "50051",
        "--metrics-port", "9090",
        "--worker-id", "$(POD_NAME)",
        "--advertise-address", "$(POD_IP):50051",
        "--deployment", "llama",
        "--redis-url", "$(KVMESH_REDIS_URL)",
        "--dtype", "auto",
        "--block-size", "16",
        "--max-num-seqs", "256",
        "--max-model-len", "4096",
        "--gpu-memory-utilization", "0.85",
        "--tensor-parallel-size", "1",
        "--shutdown-grace", "55",
        "--enable-prefix-caching",
    ]  # fmt: skip


def test_deployment_requests_gpus_and_tolerates_gpu_taint() -> None:
    s = spec(resources={"gpus": 4, "cpu": 8, "memory": "64Gi"}, engine={"tensorParallelSize": 4})
    dep = builders.build_worker_deployment(OWNER, s, CONFIG)
    res = worker(dep)["resources"]
    assert res["limits"]["nvidia.com/gpu"] == "4" and res["requests"]["nvidia.com/gpu"] == "4"
    assert res["requests"]["cpu"] == "8" and res["limits"]["memory"] == "64Gi"
    pod = dep["spec"]["template"]["spec"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert "--tensor-parallel-size" in worker(dep)["command"]
    assert worker(dep)["command"][worker(dep)["command"].index("--tensor-parallel-size") + 1] == "4"


def test_cpu_worker_requests_no_gpu() -> None:
    dep = builders.build_worker_deployment(OWNER, spec(resources={"gpus": 0}), CONFIG)
    assert "nvidia.com/gpu" not in str(worker(dep)["resources"])
    assert "tolerations" not in dep["spec"]["template"]["spec"]


def test_probes_use_grpc_health_on_the_worker_port() -> None:
    container = worker(builders.build_worker_deployment(OWNER, spec(), CONFIG))
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"] == {"port": 50051}
    # Model loading is covered by the startup probe, not by a liveness restart loop.
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 1800
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": 50051, "metrics": 9090}


def test_runs_as_non_root_with_a_read_only_root_filesystem() -> None:
    dep = builders.build_worker_deployment(OWNER, spec(), CONFIG)
    pod = dep["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 1000
    sc = worker(dep)["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"] == {"drop": ["ALL"]}
    mounts = {m["mountPath"] for m in worker(dep)["volumeMounts"]}
    assert {"/tmp", "/var/cache/kvmesh", "/dev/shm", "/etc/kvmesh", "/models"} <= mounts


def test_redis_url_from_operator_default_secret_or_spec() -> None:
    plain = env_of(worker(builders.build_worker_deployment(OWNER, spec(), CONFIG)))["KVMESH_REDIS_URL"]
    assert plain == {"name": "KVMESH_REDIS_URL", "value": "redis://r:6379/0"}
    secret_config = OperatorConfig(redis_secret_name="kvmesh-redis-url", redis_secret_key="url")
    env = env_of(worker(builders.build_worker_deployment(OWNER, spec(), secret_config)))
    assert env["KVMESH_REDIS_URL"]["valueFrom"] == {
        "secretKeyRef": {"name": "kvmesh-redis-url", "key": "url"}
    }
    own = spec(redis={"urlSecretRef": {"name": "mine", "key": "u"}})
    env = env_of(worker(builders.build_worker_deployment(OWNER, own, secret_config)))
    assert env["KVMESH_REDIS_URL"]["valueFrom"]["secretKeyRef"] == {"name": "mine", "key": "u"}


@pytest.mark.parametrize(
    ("model", "volume", "model_arg"),
    [
        ({"source": "hf://Qwen/Qwen2-0.5B"}, {"name": "model", "emptyDir": {}}, "Qwen/Qwen2-0.5B"),
        (
            {"source": "pvc://weights/llama/8b"},
            {"name": "model", "persistentVolumeClaim": {"claimName": "weights", "readOnly": True}},
            "/models/llama/8b",
        ),
        (
            {"source": "pvc://weights", "file": "m.gguf"},
            {"name": "model", "persistentVolumeClaim": {"claimName": "weights", "readOnly": True}},
            "/models/m.gguf",
        ),
        (
            {"source": "hostpath:///data/smol", "file": "SmolLM2.gguf"},
            {"name": "model", "hostPath": {"path": "/data/smol", "type": "Directory"}},
            "/models/SmolLM2.gguf",
        ),
    ],
)
def test_model_sources_mount_and_point_the_worker(model: dict, volume: dict, model_arg: str) -> None:
    dep = builders.build_worker_deployment(OWNER, spec(model=model), CONFIG)
    assert volume in dep["spec"]["template"]["spec"]["volumes"]
    command = worker(dep)["command"]
    assert command[command.index("--model") + 1] == model_arg
    assert env_of(worker(dep))["KVMESH_MODEL"]["value"] == model["source"]


def test_served_name_is_a_worker_flag() -> None:
    command = builders.worker_command("llama", spec(model={"source": "hf://a/b", "servedName": "llama-3"}))
    assert command[command.index("--served-model-name") + 1] == "llama-3"
    assert "--served-model-name" not in builders.worker_command("llama", spec())


def test_hf_revision_and_tokenizer_travel_by_env() -> None:
    s = spec(model={"source": "hf://a/b", "revision": "v2", "tokenizer": "a/tok"})
    env = env_of(worker(builders.build_worker_deployment(OWNER, s, CONFIG)))
    assert env["KVMESH_MODEL_REVISION"]["value"] == "v2" and env["KVMESH_TOKENIZER"]["value"] == "a/tok"
    assert env["HF_HOME"]["value"].startswith("/models/")


def test_unknown_model_scheme_is_an_error() -> None:
    with pytest.raises(ValueError, match="hf://"):
        builders.resolve_model({"source": "s3://bucket/x"})


def test_user_env_overrides_builtin_env() -> None:
    s = spec(
        env=[{"name": "KVMESH_REDIS_URL", "value": "redis://other:1/0"}, {"name": "HF_TOKEN", "value": "t"}]
    )
    env = worker(builders.build_worker_deployment(OWNER, s, CONFIG))["env"]
    redis = [e for e in env if e["name"] == "KVMESH_REDIS_URL"]
    assert redis == [{"name": "KVMESH_REDIS_URL", "value": "redis://other:1/0"}]
    assert {"name": "HF_TOKEN", "value": "t"} in env


def test_pod_template_overrides_merge_without_breaking_the_selector() -> None:
    s = spec(
        podTemplate={
            "metadata": {"labels": {"team": "a", "app.kubernetes.io/instance": "hijack"}},
            "spec": {"priorityClassName": "high", "imagePullSecrets": [{"name": "reg"}], "containers": []},
        }
    )
    dep = builders.build_worker_deployment(OWNER, s, CONFIG)
    template = dep["spec"]["template"]
    assert template["metadata"]["labels"]["team"] == "a"
    assert template["metadata"]["labels"]["app.kubernetes.io/instance"] == "llama"
    assert template["spec"]["priorityClassName"] == "high"
    assert template["spec"]["imagePullSecrets"] == [{"name": "reg"}]
    assert len(template["spec"]["containers"]) == 1


def test_engine_change_changes_config_hash_and_so_rolls_out() -> None:
    a = builders.build_worker_deployment(OWNER, spec(), CONFIG)["spec"]["template"]["metadata"]["annotations"]
    b = builders.build_worker_deployment(OWNER, spec(engine={"maxNumSeqs": 64}), CONFIG)
    b_ann = b["spec"]["template"]["metadata"]["annotations"]
    assert a[builders.CONFIG_HASH_ANNOTATION] != b_ann[builders.CONFIG_HASH_ANNOTATION]
    # Routing is the gateways' business: changing it must not restart the workers.
    d = builders.build_worker_deployment(OWNER, spec(routing={"policy": "least-load"}), CONFIG)
    assert (
        d["spec"]["template"] == builders.build_worker_deployment(OWNER, spec(), CONFIG)["spec"]["template"]
    )
    # Replicas are not configuration: scaling must not restart the pods.
    c = builders.build_worker_deployment(OWNER, spec(replicas=5), CONFIG)
    assert (
        c["spec"]["template"] == builders.build_worker_deployment(OWNER, spec(), CONFIG)["spec"]["template"]
    )
    assert c["spec"]["replicas"] == 5


def test_image_defaults_to_operator_and_can_be_overridden() -> None:
    assert worker(builders.build_worker_deployment(OWNER, spec(), CONFIG))["image"] == CONFIG.worker_image
    own = builders.build_worker_deployment(OWNER, spec(image="mine:1"), CONFIG)
    assert worker(own)["image"] == "mine:1"


# ---- other children ------------------------------------------------------------------------------


def test_every_child_is_owned_by_the_inference_deployment() -> None:
    children = builders.build_children(OWNER, spec(), CONFIG)
    assert [c["kind"] for c in children] == ["ConfigMap", "Service", "PodDisruptionBudget", "Deployment"]
    for child in children:
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


def test_headless_service_selects_the_workers() -> None:
    svc = builders.build_service(OWNER)
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["selector"] == builders.selector_labels("llama")
    dep = builders.build_worker_deployment(OWNER, spec(), CONFIG)
    assert dep["spec"]["selector"]["matchLabels"] == svc["spec"]["selector"]
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert all(labels[k] == v for k, v in svc["spec"]["selector"].items())


def test_pdb_allows_one_voluntary_disruption() -> None:
    pdb = builders.build_pdb(OWNER)
    assert pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"] == builders.selector_labels("llama")


def test_configmap_resolves_routing_block_size_and_gateway_args() -> None:
    data = builders.build_configmap(OWNER, spec(engine={"blockSize": 32}))["data"]
    assert '"blockSize": 32' in data["deployment.json"]
    assert "--policy prefix" in data["gateway-args"] and "--load-factor 1.25" in data["gateway-args"]
    assert "--deployment llama" in data["gateway-args"]


def test_selector_string_matches_the_labels() -> None:
    assert (
        builders.selector_string("llama")
        == "app.kubernetes.io/instance=llama,app.kubernetes.io/name=kvmesh-worker"
    )


def test_samples_are_valid_against_the_builders() -> None:
    samples = sorted((REPO / "deploy" / "samples").glob("*.yaml"))
    assert samples, "no samples"
    for path in samples:
        for doc in yaml.safe_load_all(path.read_text()):
            assert doc["apiVersion"] == crd.API_VERSION and doc["kind"] == crd.KIND
            owner = Owner(doc["metadata"]["name"], "default", "uid")
            assert builders.build_children(owner, doc["spec"], CONFIG)


# ---- status conditions ---------------------------------------------------------------------------


def deployment_state(generation: int = 1, observed: int = 1, **fields: int) -> dict:
    return {"metadata": {"generation": generation}, "status": {"observedGeneration": observed, **fields}}


def conditions(result: dict) -> dict:
    return {c["type"]: c for c in result["conditions"]}


def test_status_all_ready() -> None:
    dep = deployment_state(replicas=2, updatedReplicas=2, readyReplicas=2, availableReplicas=2)
    got = status.compute_status(
        generation=3, desired=2, selector="s", endpoint="e", deployment=dep, previous=None, now="T1"
    )
    c = conditions(got)
    assert (c["Ready"]["status"], c["Ready"]["reason"]) == ("True", "AllReplicasReady")
    assert (c["Progressing"]["status"], c["Progressing"]["reason"]) == ("False", "Complete")
    assert (c["Degraded"]["status"], c["Degraded"]["reason"]) == ("False", "AsExpected")
    assert got["observedGeneration"] == 3 and got["readyReplicas"] == 2 and got["selector"] == "s"
    assert all(x["observedGeneration"] == 3 for x in got["conditions"])


def test_status_rolling_out_and_not_ready() -> None:
    dep = deployment_state(generation=2, observed=1, replicas=1)
    c = conditions(
        status.compute_status(
            generation=1, desired=1, selector="", endpoint="", deployment=dep, previous=None
        )
    )
    assert (c["Progressing"]["status"], c["Progressing"]["reason"]) == ("True", "RollingOut")
    assert (c["Ready"]["status"], c["Ready"]["reason"]) == ("False", "NoReplicasReady")


def test_status_degraded_on_progress_deadline() -> None:
    dep = deployment_state(replicas=1, updatedReplicas=1)
    dep["status"]["conditions"] = [
        {"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded", "message": "slow"}
    ]
    c = conditions(
        status.compute_status(
            generation=1, desired=1, selector="", endpoint="", deployment=dep, previous=None
        )
    )
    assert (c["Degraded"]["status"], c["Degraded"]["reason"]) == ("True", "ProgressDeadlineExceeded")
    assert c["Progressing"]["status"] == "False"


def test_apply_failure_keeps_observed_generation() -> None:
    got = status.compute_status(
        generation=5,
        desired=1,
        selector="",
        endpoint="",
        deployment=None,
        previous={"observedGeneration": 4},
        apply_error="forbidden",
    )
    assert got["observedGeneration"] == 4
    assert conditions(got)["Degraded"]["reason"] == "ApplyFailed"


def test_last_transition_time_changes_only_when_status_flips() -> None:
    not_ready = deployment_state(replicas=1, updatedReplicas=1)
    ready = deployment_state(replicas=1, updatedReplicas=1, readyReplicas=1, availableReplicas=1)
    kw = {"generation": 1, "desired": 1, "selector": "", "endpoint": ""}
    first = status.compute_status(**kw, deployment=not_ready, previous=None, now="T1")
    same = status.compute_status(**kw, deployment=not_ready, previous=first, now="T2")
    assert conditions(same)["Ready"]["lastTransitionTime"] == "T1"
    flipped = status.compute_status(**kw, deployment=ready, previous=same, now="T3")
    assert conditions(flipped)["Ready"]["lastTransitionTime"] == "T3"
    assert conditions(flipped)["Degraded"]["lastTransitionTime"] == "T1"  # stayed False
    assert not status.changed(
        flipped, status.compute_status(**kw, deployment=ready, previous=flipped, now="T4")
    )


def test_scaled_to_zero_is_not_ready() -> None:
    dep = deployment_state()
    c = conditions(
        status.compute_status(
            generation=1, desired=0, selector="", endpoint="", deployment=dep, previous=None
        )
    )
    assert (c["Ready"]["status"], c["Ready"]["reason"]) == ("False", "ScaledToZero")
    assert c["Progressing"]["reason"] == "Complete"


# ---- handler wiring ------------------------------------------------------------------------------


def test_no_handler_puts_a_finalizer_on_inference_deployments() -> None:
    """Deletion must never wait for the operator: children go with the garbage collector."""
    import kopf

    from kvmesh.operator.main import register
    from kvmesh.operator.reconcile import Reconciler

    registry = kopf.OperatorRegistry()
    register(registry, Reconciler(kube=None, config=CONFIG), resync=10)  # type: ignore[arg-type]
    handlers = [*registry._spawning._handlers, *registry._changing._handlers]
    assert len(handlers) >= 4
    assert not [h.id for h in handlers if h.requires_finalizer]


def test_repeated_errors_post_one_event() -> None:
    from kvmesh.operator.reconcile import Reconciler

    r = Reconciler(kube=None, config=CONFIG)  # type: ignore[arg-type]
    assert r.is_new_error("ns", "a", "refused")
    assert not r.is_new_error("ns", "a", "refused")
    assert r.is_new_error("ns", "a", "refused differently")
    assert not r.is_new_error("ns", "a", None)
    assert r.is_new_error("ns", "a", "refused")  # after a success, the same error is news again


# ---- contracts with the other CLIs ----------------------------------------------------------------


def test_worker_command_parses_with_the_worker_cli() -> None:
    """The command the operator writes is accepted by `kvmesh worker` as it is today."""
    import argparse

    from kvmesh.worker import cli as worker_cli

    s = spec(model={"source": "pvc://w/m", "servedName": "m"}, engine={"tensorParallelSize": 1})
    command = builders.worker_command("llama", s)
    assert command[:2] == ["kvmesh", "worker"]
    parser = argparse.ArgumentParser()
    worker_cli.configure(parser)
    args = parser.parse_args(command[2:])
    assert (args.model, args.port, args.deployment, args.block_size) == ("/models/m", 50051, "llama", 16)
    assert args.redis_url == "$(KVMESH_REDIS_URL)"  # expanded by the kubelet from the env
    for path in sorted((REPO / "deploy" / "samples").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            parser.parse_args(builders.worker_command(doc["metadata"]["name"], doc["spec"])[2:])


def test_gateway_args_parse_with_the_gateway_cli() -> None:
    """Both the ConfigMap's gateway-args and the chart's gateway args are accepted by `kvmesh gateway`."""
    import argparse

    from kvmesh.gateway import cli as gateway_cli

    parser = argparse.ArgumentParser()
    gateway_cli.configure(parser)
    args = parser.parse_args(builders.gateway_args("llama", spec(routing={"policy": "least-load"})))
    assert (args.deployment, args.policy, args.load_factor) == ("llama", "least-load", 1.25)
    chart = (REPO / "deploy" / "helm" / "kvmesh" / "templates" / "gateway-deployment.yaml").read_text()
    chart_args = [line.strip()[2:] for line in chart.splitlines() if line.strip().startswith("- --")]
    values = {
        "{{ .Values.gateway.deployment }}": "smollm2",
        "{{ .Values.gateway.policy }}": "prefix",
        "{{ .Values.gateway.loadFactor }}": "1.25",
    }
    rendered = []
    for arg in chart_args:
        for template, value in values.items():
            arg = arg.replace(template, value)
        rendered.append(arg)
    assert "{{" not in " ".join(rendered), rendered
    args = parser.parse_args(rendered)
    assert (args.port, args.deployment) == (50051, "smollm2")


# Caches the worker's libraries write (kvmesh's GGUF conversions, Hugging Face, Triton kernels).
CACHE_ENV = ("KVMESH_CACHE", "HF_HOME", "XDG_CACHE_HOME", "TRITON_CACHE_DIR", "TRITON_HOME")


@pytest.mark.parametrize("source", ["hf://a/b", "hostpath:///data/smol", "pvc://weights/m"])
def test_every_cache_lives_on_a_writable_volume(source: str) -> None:
    """The root filesystem is read-only, so a cache outside a writable mount crashes the worker."""
    container = worker(builders.build_worker_deployment(OWNER, spec(model={"source": source}), CONFIG))
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    writable = [m["mountPath"] for m in container["volumeMounts"] if not m.get("readOnly")]
    env = env_of(container)
    for name in CACHE_ENV:
        path = env[name]["value"]
        assert any(path == m or path.startswith(m + "/") for m in writable), (name, path, writable)
