"""The operator against a real kube-apiserver + controller-manager: CRD validation, children, status,
scaling, drift repair, autoscaling from a real redis-server, routing delivery, leader election and
garbage collection on deletion."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from kvmesh.operator import builders, crd, routing, workerpod
from kvmesh.operator.spec import DeploymentSpec, RoutingSpec
from kvmesh.store.redis_keys import RedisKeys

from .cluster import _die_with_parent, free_port

pytestmark = pytest.mark.controlplane

REPO = Path(__file__).resolve().parents[2]
CRD_FILE = REPO / "deploy" / "helm" / "kvmesh" / "files" / "crds" / "inferencedeployments.kvmesh.io.yaml"
SAMPLES = REPO / "deploy" / "samples"
WORKER_IMAGE = "registry.test/kvmesh-worker:9.9.9"
NAMESPACE = "kvmesh-optest"
RESYNC = 1.5


class OperatorProcess:
    """`kvmesh operator` as a real process with a kubeconfig; stopped (TERM, then KILL) by stop()."""

    def __init__(
        self, kubeconfig: Path, log_path: Path, *args: str, env: dict[str, str] | None = None
    ) -> None:
        self.health_port = free_port()
        self.log_path = log_path
        cmd = [
            sys.executable, "-m", "kvmesh.cli", "operator",
            f"--kubeconfig={kubeconfig}",
            f"--liveness=http://127.0.0.1:{self.health_port}/healthz",
            f"--resync-seconds={RESYNC}",
            f"--worker-image={WORKER_IMAGE}",
            "--log-format=plain",
            *args,
        ]  # fmt: skip
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            cmd,
            cwd=REPO,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent,  # never outlives a killed test run
            env={**os.environ, **(env or {}), "KUBECONFIG": str(kubeconfig), "PYTHONUNBUFFERED": "1"},
        )

    def healthy(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"operator exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}/healthz", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def wait_healthy(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.healthy():
            if time.monotonic() > deadline:
                raise AssertionError(f"operator not healthy after {timeout}s:\n{self.log()[-4000:]}")
            time.sleep(0.3)

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 15.0) -> None:
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
            if self.proc.poll() is not None:
                break
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(wait)
        self._log.close()


class RedisServer:
    """A real redis-server on a free loopback port, no persistence."""

    def __init__(self, directory: Path) -> None:
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            cwd=directory,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        import redis

        self.client = redis.Redis(port=self.port)
        deadline = time.monotonic() + 20
        while True:
            try:
                self.client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise
                time.sleep(0.1)

    def report(
        self,
        deployment: str,
        workers: dict[str, tuple[int, int, float]],
        ttl: int = 30,
        namespace: str = NAMESPACE,
    ) -> None:
        """Write worker load the way workers do: hash per worker with a TTL, plus the member set."""
        keys = RedisKeys(f"{namespace}/{deployment}")
        now = time.time()
        pipe = self.client.pipeline()
        for worker_id, (running, waiting, kv) in workers.items():
            key = keys.worker(worker_id)
            pipe.hset(key, mapping={"running": running, "waiting": waiting, "kv_usage": kv, "heartbeat": now})
            pipe.expire(key, ttl)
            pipe.sadd(keys.workers, worker_id)
        pipe.execute()

    def stop(self) -> None:
        self.client.close()
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


# ---- helpers -------------------------------------------------------------------------------------


def get(kube: Any, *args: str, namespace: str = NAMESPACE) -> dict | None:
    done = kube.kubectl("get", *args, "-n", namespace, "-o", "json", check=False)
    return json.loads(done.stdout) if done.returncode == 0 else None


def condition(obj: dict | None, kind: str) -> dict:
    for cond in ((obj or {}).get("status") or {}).get("conditions") or []:
        if cond["type"] == kind:
            return cond
    return {}


def inference_deployment(name: str, **spec: Any) -> dict:
    body = {"model": {"source": "hostpath:///srv/models/smollm2"}, "resources": {"gpus": 0}, **spec}
    return {
        "apiVersion": crd.API_VERSION,
        "kind": crd.KIND,
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": body,
    }


def established(kube: Any, name: str) -> bool:
    done = kube.kubectl("get", "crd", name, "-o", "json", check=False)
    if done.returncode != 0:
        return False
    conditions = json.loads(done.stdout).get("status", {}).get("conditions") or []
    return any(c["type"] == "Established" and c["status"] == "True" for c in conditions)


def install_crd(kube: Any) -> None:
    kube.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRD_FILE))
    name = f"{crd.PLURAL}.{crd.GROUP}"
    kube.wait_for(lambda: established(kube, name), timeout=60, what=f"CRD {name} established")


# ---- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def cluster(kube: Any) -> Any:
    install_crd(kube)
    if kube.kubectl("get", "namespace", NAMESPACE, check=False).returncode != 0:
        kube.kubectl("create", "namespace", NAMESPACE)
    return kube


@pytest.fixture(scope="module")
def operator(
    cluster: Any, redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Any]:
    log = tmp_path_factory.mktemp("operator") / "operator.log"
    proc = OperatorProcess(
        cluster.kubeconfig, log, f"--namespace={NAMESPACE}", f"--redis-url={redis_server.url}"
    )
    try:
        proc.wait_healthy()
        yield proc
    finally:
        proc.stop()
        print(proc.log()[-6000:])


# ---- the API server validates ---------------------------------------------------------------------


INVALID = [
    (
        "bad-range",
        {"autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 2}},
        "autoscaling.minReplicas must be less than or equal to autoscaling.maxReplicas",
    ),
    (
        "tensor-parallel-gpus",
        {"resources": {"gpus": 2}, "engine": {"tensorParallelSize": 4}},
        "resources.gpus must equal engine.tensorParallelSize (or be 0 for CPU)",
    ),
    (
        "idle-gpus",
        {"resources": {"gpus": 8}},
        "resources.gpus must equal engine.tensorParallelSize (or be 0 for CPU)",
    ),
    ("bad-scheme", {"model": {"source": "s3://bucket/model"}}, "model.source must start with hf://"),
    (
        "hf-path",
        {"model": {"source": "hf://org/repo/model.gguf"}},
        "an hf:// model.source is hf://<org>/<repo>; name a file inside it with model.file",
    ),
    (
        "no-progress",
        {"rollout": {"maxSurge": 0, "maxUnavailable": 0}},
        "rollout.maxSurge and rollout.maxUnavailable cannot both be 0",
    ),
    ("short-startup", {"rollout": {"startupTimeoutSeconds": 5}}, "startupTimeoutSeconds"),
    (
        "redis-credentials",
        {"redis": {"url": "redis://:secret@redis:6379/0"}},
        "redis.url must not carry credentials",
    ),
    ("bad-replicas", {"replicas": -1}, "spec.replicas"),
    ("bad-policy", {"routing": {"policy": "random"}}, "Unsupported value"),
    (
        "bad-kv-target",
        {"autoscaling": {"target": {"metric": "kvUsage", "value": 80}}},
        "a kvUsage target value is a fraction and must be at most 1.0",
    ),
    ("bad-hostpath", {"model": {"source": "hostpath://relative/dir"}}, "must be an absolute path"),
]


@pytest.mark.parametrize(("name", "spec", "message"), INVALID, ids=[i[0] for i in INVALID])
def test_api_server_rejects_invalid_resources(cluster: Any, name: str, spec: dict, message: str) -> None:
    obj = inference_deployment(name, **spec)
    done = cluster.kubectl("apply", "-f", "-", input=json.dumps(obj), check=False)
    assert done.returncode != 0, done.stdout
    assert message in done.stderr, done.stderr
    assert get(cluster, crd.PLURAL, name) is None


def test_api_server_rejects_names_too_long_for_the_worker_service(cluster: Any) -> None:
    obj = inference_deployment("x" * 57)
    done = cluster.kubectl("apply", "-f", "-", input=json.dumps(obj), check=False)
    assert done.returncode != 0
    assert "metadata.name must be at most 56 characters" in done.stderr, done.stderr


def test_api_server_rejects_missing_model(cluster: Any) -> None:
    obj = inference_deployment("no-model")
    del obj["spec"]["model"]
    done = cluster.kubectl("apply", "-f", "-", input=json.dumps(obj), check=False)
    assert done.returncode != 0
    assert "spec.model: Required value" in done.stderr, done.stderr


def test_api_server_applies_defaults(cluster: Any) -> None:
    obj = inference_deployment("defaults-only")
    out = json.loads(
        cluster.kubectl("apply", "--dry-run=server", "-o", "json", "-f", "-", input=json.dumps(obj)).stdout
    )
    assert out["spec"]["replicas"] == 1
    assert out["spec"]["engine"]["blockSize"] == 16 and out["spec"]["engine"]["dtype"] == "auto"
    assert out["spec"]["autoscaling"] == crd.apply_defaults(obj["spec"])["autoscaling"]
    assert out["spec"] == crd.apply_defaults(obj["spec"])  # the operator's defaulting agrees with the server


def test_samples_are_accepted(cluster: Any) -> None:
    for path in sorted(SAMPLES.glob("*.yaml")):
        cluster.kubectl("apply", "--dry-run=server", "-n", NAMESPACE, "-f", str(path))


# ---- the operator reconciles ----------------------------------------------------------------------


def test_children_are_created_with_spec_and_owner_references(cluster: Any, operator: Any) -> None:
    cluster.kubectl("apply", "-n", NAMESPACE, "-f", str(SAMPLES / "smollm2-cpu.yaml"))
    owner = get(cluster, crd.PLURAL, "smollm2")
    assert owner is not None
    dep = cluster.wait_for(
        lambda: get(cluster, "deployment", "smollm2-worker"), timeout=60, what="worker Deployment"
    )
    expected_ref = {
        "apiVersion": "kvmesh.io/v1alpha1",
        "kind": "InferenceDeployment",
        "name": "smollm2",
        "uid": owner["metadata"]["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }
    assert dep["metadata"]["ownerReferences"] == [expected_ref]
    # No finalizer: deleting never waits for the operator.
    assert not get(cluster, crd.PLURAL, "smollm2")["metadata"].get("finalizers")
    container = dep["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == WORKER_IMAGE
    assert container["command"] == workerpod.worker_command(
        "smollm2", NAMESPACE, DeploymentSpec.parse(owner["spec"])
    )
    # Nothing secret in argv, and no env or ConfigMap that no program reads.
    assert not any("redis" in arg for arg in container["command"])
    assert {e["name"] for e in container["env"]} >= {"KVMESH_REDIS_URL", "KVMESH_CACHE", "HF_HOME"}
    assert not {"KVMESH_MODEL", "KVMESH_DEPLOYMENT", "KVMESH_TOKENIZER"} & {
        e["name"] for e in container["env"]
    }
    assert not [v for v in dep["spec"]["template"]["spec"]["volumes"] if "configMap" in v]
    assert container["command"][container["command"].index("--model") + 1] == (
        "/models/SmolLM2-135M-Instruct.Q4_1.gguf"
    )
    assert container["readinessProbe"]["grpc"]["port"] == 50051
    sample = yaml.safe_load((SAMPLES / "smollm2-cpu.yaml").read_text())["spec"]
    assert container["resources"]["requests"] == {
        "cpu": str(sample["resources"]["cpu"]),
        "memory": str(sample["resources"]["memory"]),
        "ephemeral-storage": sample["cache"]["sizeLimit"],  # the cache emptyDir's budget
    }
    assert dep["spec"]["replicas"] == 1
    assert dep["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
    full = json.loads(
        cluster.kubectl(
            "get", "deployment", "smollm2-worker", "-n", NAMESPACE, "-o", "json", "--show-managed-fields"
        ).stdout
    )
    managers = {m["manager"] for m in full["metadata"]["managedFields"] if m["operation"] == "Apply"}
    assert managers == {"kvmesh-operator"}
    for kind, name in (("service", "smollm2-worker"), ("pdb", "smollm2-worker")):
        child = cluster.wait_for(lambda k=kind, n=name: get(cluster, k, n), timeout=30, what=f"{kind}/{name}")
        assert child["metadata"]["ownerReferences"] == [expected_ref], kind
    assert get(cluster, "service", "smollm2-worker")["spec"]["clusterIP"] == "None"
    # The controller-manager acts on what the operator wrote: a ReplicaSet and a (pending) pod.
    cluster.wait_for(
        lambda: get(cluster, "replicasets", "-l", "app.kubernetes.io/instance=smollm2")["items"], timeout=60
    )


def test_status_reports_conditions_and_observed_generation(cluster: Any, operator: Any) -> None:
    def observed() -> dict | None:
        obj = get(cluster, crd.PLURAL, "smollm2")
        status = (obj or {}).get("status") or {}
        if status.get("observedGeneration") == obj["metadata"]["generation"] and condition(obj, "Ready"):
            return obj
        return None

    obj = cluster.wait_for(observed, timeout=60, what="status")
    status = obj["status"]
    assert status["selector"] == "app.kubernetes.io/instance=smollm2,app.kubernetes.io/name=kvmesh-worker"
    assert status["endpoint"] == f"smollm2-worker.{NAMESPACE}.svc:50051"
    # No kubelet: the pod never runs, so the deployment is not ready and still progressing.
    assert (condition(obj, "Ready")["status"], condition(obj, "Ready")["reason"]) == (
        "False",
        "NoReplicasReady",
    )
    assert condition(obj, "Progressing")["status"] == "True"
    assert (condition(obj, "Degraded")["status"], condition(obj, "Degraded")["reason"]) == (
        "False",
        "AsExpected",
    )
    # Printer columns.
    table = cluster.kubectl("get", crd.PLURAL, "smollm2", "-n", NAMESPACE).stdout
    assert table.split("\n")[0].split() == ["NAME", "MODEL", "READY", "DESIRED", "AGE"]
    assert "hostpath:///var/lib/kvmesh/models/smollm2" in table


def test_ready_flips_when_pods_become_ready(cluster: Any, operator: Any) -> None:
    """Play the kubelet: mark the worker pod Ready, and the Ready condition flips with a new time."""
    before = condition(get(cluster, crd.PLURAL, "smollm2"), "Ready")
    pods = cluster.wait_for(
        lambda: get(cluster, "pods", "-l", "app.kubernetes.io/instance=smollm2")["items"], timeout=60
    )
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    for pod in pods:
        status = {
            "phase": "Running",
            "conditions": [
                {"type": "Ready", "status": "True", "lastTransitionTime": now},
                {"type": "ContainersReady", "status": "True", "lastTransitionTime": now},
            ],
        }
        cluster.kubectl(
            "patch", "pod", pod["metadata"]["name"], "-n", NAMESPACE, "--subresource=status",
            "--type=merge", "-p", json.dumps({"status": status}),
        )  # fmt: skip

    def ready() -> dict | None:
        obj = get(cluster, crd.PLURAL, "smollm2")
        return obj if condition(obj, "Ready").get("status") == "True" else None

    obj = cluster.wait_for(ready, timeout=60, what="Ready=True")
    cond = condition(obj, "Ready")
    assert cond["reason"] == "AllReplicasReady"
    assert obj["status"]["readyReplicas"] == 1
    assert cond["lastTransitionTime"] >= before["lastTransitionTime"]
    assert condition(obj, "Progressing")["reason"] == "Complete"
    # Stable from now on: the time does not move while the status does not flip.
    time.sleep(RESYNC * 3)
    assert (
        condition(get(cluster, crd.PLURAL, "smollm2"), "Ready")["lastTransitionTime"]
        == cond["lastTransitionTime"]
    )


def operator_requests(cluster: Any) -> float:
    """The API server's count of the requests only the operator makes: server-side applies (the
    controller-manager never applies) and single-Deployment GETs (controllers use watches)."""
    total = 0.0
    for line in cluster.kubectl("get", "--raw", "/metrics").stdout.splitlines():
        if not line.startswith("apiserver_request_total{"):
            continue
        if 'verb="APPLY"' in line or ('verb="GET"' in line and 'resource="deployments"' in line):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_an_idle_deployment_costs_no_api_requests(cluster: Any, operator: Any) -> None:
    """Status and drift repair follow watch events: nothing is applied or read while nothing changes
    (a 15 s resync timer used to cost 4 applies and a GET per object per tick)."""
    before = operator_requests(cluster)
    time.sleep(RESYNC * 4)
    assert operator_requests(cluster) - before == 0


def test_spec_change_rolls_out_and_moves_observed_generation(cluster: Any, operator: Any) -> None:
    cluster.kubectl(
        "patch", crd.PLURAL, "smollm2", "-n", NAMESPACE, "--type=merge",
        "-p", json.dumps({"spec": {"engine": {"maxNumSeqs": 8}}}),
    )  # fmt: skip
    generation = get(cluster, crd.PLURAL, "smollm2")["metadata"]["generation"]
    assert generation >= 2

    def rolled() -> dict | None:
        d = get(cluster, "deployment", "smollm2-worker")
        command = d["spec"]["template"]["spec"]["containers"][0]["command"]
        return d if command[command.index("--max-num-seqs") + 1] == "8" else None

    cluster.wait_for(rolled, timeout=30, what="new engine args")
    cluster.wait_for(
        lambda: get(cluster, crd.PLURAL, "smollm2")["status"].get("observedGeneration") == generation,
        timeout=30,
        what="observedGeneration",
    )


def test_kubectl_scale_changes_the_deployment(cluster: Any, operator: Any) -> None:
    cluster.kubectl("scale", crd.PLURAL, "smollm2", "-n", NAMESPACE, "--replicas=3")
    cluster.wait_for(
        lambda: get(cluster, "deployment", "smollm2-worker")["spec"]["replicas"] == 3,
        timeout=30,
        what="replicas=3",
    )
    scale = json.loads(
        cluster.kubectl(
            "get",
            "--raw",
            f"/apis/kvmesh.io/v1alpha1/namespaces/{NAMESPACE}/inferencedeployments/smollm2/scale",
        ).stdout
    )
    assert scale["spec"]["replicas"] == 3
    assert scale["status"]["selector"] == builders.selector_string("smollm2")


def test_an_hpa_scales_through_the_scale_subresource(cluster: Any, operator: Any) -> None:
    """The controller-manager's HPA controller reads and writes our scale subresource: below its
    minReplicas it scales up (no metrics needed for that), and the operator follows."""
    cluster.apply(inference_deployment("hpa-target", replicas=1))
    hpa = {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": "hpa-target", "namespace": NAMESPACE},
        "spec": {
            "scaleTargetRef": {"apiVersion": crd.API_VERSION, "kind": crd.KIND, "name": "hpa-target"},
            "minReplicas": 2,
            "maxReplicas": 3,
            "metrics": [
                {
                    "type": "Resource",
                    "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 50}},
                }
            ],
        },
    }
    cluster.apply(hpa)
    cluster.wait_for(
        lambda: (get(cluster, "deployment", "hpa-target-worker") or {}).get("spec", {}).get("replicas") == 2,
        timeout=90,
        interval=1,
        what="HPA scaled the worker Deployment to its minReplicas",
    )
    assert get(cluster, crd.PLURAL, "hpa-target")["spec"]["replicas"] == 2
    status = get(cluster, "hpa", "hpa-target")["status"]
    able = [c for c in status.get("conditions", []) if c["type"] == "AbleToScale"]
    assert able and able[0]["status"] == "True", status
    cluster.kubectl("delete", "hpa", "hpa-target", "-n", NAMESPACE)
    cluster.kubectl("delete", crd.PLURAL, "hpa-target", "-n", NAMESPACE)


def test_drift_is_repaired(cluster: Any, operator: Any) -> None:
    cluster.kubectl(
        "patch", "deployment", "smollm2-worker", "-n", NAMESPACE, "--type=merge",
        "-p", json.dumps({"spec": {"replicas": 7}}),
    )  # fmt: skip
    cluster.kubectl("delete", "service", "smollm2-worker", "-n", NAMESPACE)
    cluster.wait_for(
        lambda: get(cluster, "deployment", "smollm2-worker")["spec"]["replicas"] == 3,
        timeout=30,
        what="repaired",
    )
    cluster.wait_for(lambda: get(cluster, "service", "smollm2-worker"), timeout=30, what="Service recreated")


def test_events_are_posted(cluster: Any, operator: Any) -> None:
    def applied() -> list:
        events = get(cluster, "events", "--field-selector", "involvedObject.name=smollm2")["items"]
        return [e for e in events if e["reason"] == "Applied"]

    events = cluster.wait_for(applied, timeout=30, what="Applied events")
    assert events[0]["involvedObject"]["kind"] == "InferenceDeployment"


def test_autoscaler_scales_from_redis_load(cluster: Any, operator: Any, redis_server: RedisServer) -> None:
    obj = inference_deployment(
        "autoscaled",
        replicas=1,
        autoscaling={
            "enabled": True,
            "minReplicas": 1,
            "maxReplicas": 4,
            "target": {"metric": "queueDepth", "value": 4},
            "scaleUp": {"stabilizationWindowSeconds": 0},
            "scaleDown": {"stabilizationWindowSeconds": 6},
        },
    )
    cluster.apply(obj)
    cluster.wait_for(lambda: get(cluster, "deployment", "autoscaled-worker"), timeout=60, what="Deployment")

    def replicas_with_load(load: tuple[int, int, float], expected: int) -> bool:
        redis_server.report("autoscaled", {"pod-a": load, "pod-b": load})
        dep = get(cluster, "deployment", "autoscaled-worker")
        return dep["spec"]["replicas"] == expected

    # 2 workers x 10 requests = 20 in flight; target 4 per replica -> 5, capped by maxReplicas.
    cluster.wait_for(lambda: replicas_with_load((6, 4, 0.5), 4), timeout=60, interval=0.5, what="scale up")
    obj = get(cluster, crd.PLURAL, "autoscaled")
    assert obj["spec"]["replicas"] == 4
    assert obj["status"]["autoscaling"]["reason"] in ("ScaledUp", "Unchanged")
    assert "lastScaleTime" in obj["status"]["autoscaling"]
    events = get(cluster, "events", "--field-selector", "involvedObject.name=autoscaled")["items"]
    assert any(e["reason"] == "ScaledUp" and "to 4" in e["message"] for e in events)

    # Idle: after the 6 s scale-down window the count drops to minReplicas.
    started = time.monotonic()
    cluster.wait_for(lambda: replicas_with_load((0, 0, 0.0), 1), timeout=60, interval=0.5, what="scale down")
    assert time.monotonic() - started >= 5, "scaled down before its stabilization window"
    events = get(cluster, "events", "--field-selector", "involvedObject.name=autoscaled")["items"]
    assert any(e["reason"] == "ScaledDown" for e in events)


def test_autoscaler_holds_without_load(cluster: Any, operator: Any, redis_server: RedisServer) -> None:
    obj = inference_deployment(
        "no-load", replicas=2, autoscaling={"enabled": True, "minReplicas": 1, "maxReplicas": 3}
    )
    cluster.apply(obj)
    cluster.wait_for(
        lambda: ((get(cluster, crd.PLURAL, "no-load") or {}).get("status") or {}).get("autoscaling"),
        timeout=60,
        what="autoscaling status",
    )
    time.sleep(RESYNC * 3)
    obj = get(cluster, crd.PLURAL, "no-load")
    assert obj["spec"]["replicas"] == 2
    assert obj["status"]["autoscaling"]["reason"] == "NoMetrics"
    # With autoscaling on, the autoscaler owns the count (as an HPA does): a manual scale beyond
    # maxReplicas is brought back within bounds.
    cluster.kubectl("scale", crd.PLURAL, "no-load", "-n", NAMESPACE, "--replicas=9")
    cluster.wait_for(
        lambda: get(cluster, crd.PLURAL, "no-load")["spec"]["replicas"] == 3,
        timeout=30,
        what="clamped to max",
    )
    cluster.wait_for(
        lambda: get(cluster, "deployment", "no-load-worker")["spec"]["replicas"] == 3, timeout=30
    )


def test_a_pod_template_collision_is_reported_not_applied(cluster: Any, operator: Any) -> None:
    """A podTemplate volume named like one the operator builds: Degraded names the collision, and no
    worker Deployment with two "cache" volumes is ever attempted."""
    cluster.apply(
        inference_deployment(
            "collides", podTemplate={"spec": {"volumes": [{"name": "cache", "emptyDir": {}}]}}
        )
    )

    def degraded() -> dict | None:
        got = get(cluster, crd.PLURAL, "collides")
        return got if condition(got, "Degraded").get("reason") == "ApplyFailed" else None

    got = cluster.wait_for(degraded, timeout=60, what="Degraded=ApplyFailed")
    assert "cache is a name of a volume the operator builds" in condition(got, "Degraded")["message"]
    assert get(cluster, "deployment", "collides-worker") is None
    cluster.kubectl("delete", crd.PLURAL, "collides", "-n", NAMESPACE)


def test_a_refused_child_degrades_the_status_until_fixed(cluster: Any, operator: Any) -> None:
    """The API server refuses the worker Deployment (a pod override Deployments do not allow): the status
    says why, observedGeneration stays behind, and fixing the spec recovers."""
    obj = inference_deployment("refused", podTemplate={"spec": {"restartPolicy": "Never"}})
    cluster.apply(obj)

    def degraded() -> dict | None:
        got = get(cluster, crd.PLURAL, "refused")
        return got if condition(got, "Degraded").get("reason") == "ApplyFailed" else None

    got = cluster.wait_for(degraded, timeout=60, what="Degraded=ApplyFailed")
    assert condition(got, "Degraded")["status"] == "True"
    assert 'restartPolicy: Unsupported value: "Never"' in condition(got, "Degraded")["message"]
    assert got["status"].get("observedGeneration") != got["metadata"]["generation"]
    time.sleep(RESYNC * 3)  # several retries and timer ticks: still one warning, not one per attempt
    events = get(cluster, "events", "--field-selector", "involvedObject.name=refused")["items"]
    warnings = [e for e in events if e["type"] == "Warning"]
    assert [e["reason"] for e in warnings] == ["ApplyFailed"], warnings

    cluster.kubectl(
        "patch", crd.PLURAL, "refused", "-n", NAMESPACE, "--type=json",
        "-p", json.dumps([{"op": "remove", "path": "/spec/podTemplate"}]),
    )  # fmt: skip

    def recovered() -> dict | None:
        got = get(cluster, crd.PLURAL, "refused")
        ok = condition(got, "Degraded").get("status") == "False"
        return (
            got if ok and got["status"].get("observedGeneration") == got["metadata"]["generation"] else None
        )

    cluster.wait_for(recovered, timeout=60, what="recovered")
    assert get(cluster, "deployment", "refused-worker") is not None


def test_deleting_removes_every_child(cluster: Any, operator: Any) -> None:
    cluster.kubectl("delete", crd.PLURAL, "smollm2", "-n", NAMESPACE, "--wait=true", "--timeout=60s")

    def gone() -> bool:
        return (
            all(
                get(cluster, kind, name) is None
                for kind, name in (
                    ("deployment", "smollm2-worker"),
                    ("service", "smollm2-worker"),
                    ("pdb", "smollm2-worker"),
                )
            )
            and not get(cluster, "replicasets", "-l", "app.kubernetes.io/instance=smollm2")["items"]
        )

    cluster.wait_for(gone, timeout=90, interval=1, what="garbage collection of the children")


def test_lease_keeps_one_active_operator(cluster: Any, tmp_path: Path) -> None:
    """Two operators electing a leader through a coordination.k8s.io Lease: the holder reconciles, the
    other waits, and takes over (and repairs) when the leader stops and releases the Lease."""
    ns = "kvmesh-leader"
    if cluster.kubectl("get", "namespace", ns, check=False).returncode != 0:
        cluster.kubectl("create", "namespace", ns)
    common = (f"--namespace={ns}", f"--leader-election={ns}/kvmesh-operator", "--no-autoscaler")
    first = OperatorProcess(cluster.kubeconfig, tmp_path / "first.log", *common, "--leader-identity=first")
    cluster.wait_for(lambda: "Acquired the operator Lease" in first.log(), timeout=60, what="first leads")
    second = OperatorProcess(cluster.kubeconfig, tmp_path / "second.log", *common, "--leader-identity=second")
    try:
        first.wait_healthy()
        cluster.wait_for(lambda: "Waiting for the operator Lease" in second.log(), timeout=60, what="standby")
        second.wait_healthy()  # a standby answers its liveness probe, so it is not restarted
        lease = get(cluster, "lease", "kvmesh-operator", namespace=ns)
        assert lease["spec"]["holderIdentity"] == "first"
        obj = inference_deployment("elected")
        obj["metadata"]["namespace"] = ns
        cluster.apply(obj)
        cluster.wait_for(lambda: get(cluster, "deployment", "elected-worker", namespace=ns), timeout=60)
        assert "Applied InferenceDeployment children" in first.log()
        assert "Applied InferenceDeployment children" not in second.log()
        stopped = time.monotonic()
        first.stop()  # SIGTERM: releases the Lease, so the standby need not wait for it to expire
        assert first.proc.returncode == 0, first.log()[-3000:]  # exited by itself, not killed
        cluster.kubectl("delete", "service", "elected-worker", "-n", ns)
        cluster.wait_for(lambda: "Acquired the operator Lease" in second.log(), timeout=30, what="takeover")
        assert time.monotonic() - stopped < 12, "the standby waited for expiry: the Lease was not released"
        cluster.wait_for(lambda: get(cluster, "service", "elected-worker", namespace=ns), timeout=60)
        lease = get(cluster, "lease", "kvmesh-operator", namespace=ns)
        assert lease["spec"]["holderIdentity"] == "second" and lease["spec"]["leaseTransitions"] >= 1
    finally:
        first.stop()
        second.stop()
        print(first.log()[-3000:], second.log()[-3000:])


def test_same_names_in_two_namespaces_are_two_pools(
    cluster: Any, operator: Any, redis_server: RedisServer
) -> None:
    """Load reported for `pool` in another namespace never scales this namespace's `pool`."""
    cluster.apply(
        inference_deployment(
            "pool", replicas=1, autoscaling={"enabled": True, "minReplicas": 1, "maxReplicas": 4,
                                             "target": {"metric": "queueDepth", "value": 4}},
        )
    )  # fmt: skip
    cluster.wait_for(lambda: get(cluster, "deployment", "pool-worker"), timeout=60, what="Deployment")
    deadline = time.monotonic() + RESYNC * 6
    while time.monotonic() < deadline:
        redis_server.report("pool", {"pod-a": (40, 40, 0.9), "pod-b": (40, 40, 0.9)}, namespace="elsewhere")
        time.sleep(0.5)
    obj = get(cluster, crd.PLURAL, "pool")
    assert obj["spec"]["replicas"] == 1
    assert obj["status"]["autoscaling"]["reason"] == "NoMetrics"
    # Its own namespace's load does scale it.
    cluster.wait_for(
        lambda: (
            redis_server.report("pool", {"pod-a": (8, 8, 0.5)})
            or get(cluster, crd.PLURAL, "pool")["spec"]["replicas"] == 4
        ),
        timeout=60,
        interval=0.5,
        what="scaled by its own load",
    )
    cluster.kubectl("delete", crd.PLURAL, "pool", "-n", NAMESPACE)


def test_spec_routing_reaches_redis_and_rolls_the_gateways(
    cluster: Any, operator: Any, redis_server: RedisServer
) -> None:
    """The operator publishes spec.routing where the deployment's gateways read it, and stamps its
    hash on the gateways serving it, so a routing change restarts them with the new settings."""
    gateway = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": "routed-gateway",
            "namespace": NAMESPACE,
            "labels": {routing.GATEWAY_LABEL: "routed"},
        },
        "spec": {
            "replicas": 0,
            "selector": {"matchLabels": {"app": "routed-gateway"}},
            "template": {
                "metadata": {"labels": {"app": "routed-gateway"}},
                "spec": {"containers": [{"name": "gateway", "image": "registry.test/kvmesh:1"}]},
            },
        },
    }
    cluster.apply(gateway)
    cluster.apply(inference_deployment("routed", routing={"policy": "least-load", "loadFactor": 2}))
    key = RedisKeys(f"{NAMESPACE}/routed").routing

    def published(policy: str) -> dict | None:
        fields = {k.decode(): v.decode() for k, v in redis_server.client.hgetall(key).items()}
        return fields if fields.get("policy") == policy else None

    assert cluster.wait_for(lambda: published("least-load"), timeout=60, what="published") == {
        "policy": "least-load",
        "load_factor": "2",
    }

    def stamped(spec: RoutingSpec) -> bool:
        annotations = (
            get(cluster, "deployment", "routed-gateway")["spec"]["template"]["metadata"].get("annotations")
            or {}
        )
        return annotations.get(routing.ROUTING_ANNOTATION) == routing.routing_hash(spec)

    cluster.wait_for(lambda: stamped(RoutingSpec("least-load", 2.0)), timeout=30, what="gateway stamped")
    cluster.kubectl(
        "patch", crd.PLURAL, "routed", "-n", NAMESPACE, "--type=merge",
        "-p", json.dumps({"spec": {"routing": {"policy": "round-robin"}}}),
    )  # fmt: skip
    cluster.wait_for(lambda: published("round-robin"), timeout=30, what="republished")
    cluster.wait_for(lambda: stamped(RoutingSpec("round-robin", 2.0)), timeout=30, what="gateway re-stamped")
    # The worker Deployment did not roll for a routing change.
    worker = get(cluster, "deployment", "routed-worker")
    assert worker["metadata"]["generation"] == 1
    cluster.kubectl("delete", crd.PLURAL, "routed", "-n", NAMESPACE)
    cluster.wait_for(lambda: not redis_server.client.exists(key), timeout=30, what="settings withdrawn")
    cluster.kubectl("delete", "deployment", "routed-gateway", "-n", NAMESPACE)


def test_operator_log_is_free_of_errors(operator: Any) -> None:
    log = operator.log()
    assert "Forbidden" not in log
    assert "Traceback" not in log, log[-4000:]
    # No line per watch event: the log stays readable however busy the cluster is.
    assert ".child_changed' succeeded" not in log and ".track' succeeded" not in log


def test_operator_stops_promptly_on_sigterm(operator: Any) -> None:
    """Runs last in this module: the operator exits by itself well within a pod's grace period."""
    started = time.monotonic()
    operator.stop()
    assert operator.proc.returncode == 0 and time.monotonic() - started < 10, operator.log()[-3000:]


def test_samples_parse() -> None:
    for path in SAMPLES.glob("*.yaml"):
        assert list(yaml.safe_load_all(path.read_text()))
