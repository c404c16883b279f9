"""The chart: lint, template, install into a real API server, and the operator reconciling with the chart's
ServiceAccount token (RBAC sufficient: no Forbidden; and minimal: nothing it does not need)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from kvmesh.operator import crd

from .test_operator import SAMPLES, OperatorProcess, RedisServer, condition

pytestmark = pytest.mark.controlplane

CHART = Path(__file__).resolve().parents[2] / "deploy" / "helm" / "kvmesh"
RELEASE = "kvmesh"
NAMESPACE = "kvmesh-system"
OPERATOR_SA = "kvmesh-operator"  # <fullname>-operator; fullname is the release name when it holds "kvmesh"


def rendered(kube: Any, *args: str) -> list[dict]:
    out = kube.helm("template", RELEASE, str(CHART), "--namespace", NAMESPACE, *args).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def test_helm_lint(kube: Any) -> None:
    done = kube.helm("lint", "--strict", str(CHART))
    assert "0 chart(s) failed" in done.stdout


def test_helm_template_defaults(kube: Any) -> None:
    docs = rendered(kube)
    kinds = sorted(f"{d['kind']}/{d['metadata']['name']}" for d in docs)
    assert kinds == [
        "ClusterRole/kvmesh-operator",
        "ClusterRoleBinding/kvmesh-operator",
        "Deployment/kvmesh-gateway",
        "Deployment/kvmesh-operator",
        "Deployment/kvmesh-redis",
        "Secret/kvmesh-redis",
        "Service/kvmesh-gateway",
        "Service/kvmesh-redis",
        "ServiceAccount/kvmesh-operator",
    ]
    for doc in docs:
        labels = doc["metadata"]["labels"]
        assert labels["app.kubernetes.io/instance"] == RELEASE
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        assert "app.kubernetes.io/name" in labels and "helm.sh/chart" in labels
        if doc["kind"] == "Deployment":
            for c in doc["spec"]["template"]["spec"]["containers"]:
                assert ":" in c["image"] and not c["image"].endswith(":latest"), c["image"]
    operator = next(
        d for d in docs if d["metadata"]["name"] == "kvmesh-operator" and d["kind"] == "Deployment"
    )
    args = operator["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--standalone" in args and "--all-namespaces" in args
    assert "--redis-secret=kvmesh-redis:url" in args
    gateway = next(d for d in docs if d["metadata"]["name"] == "kvmesh-gateway" and d["kind"] == "Deployment")
    gw = gateway["spec"]["template"]["spec"]["containers"][0]
    assert gw["command"] == ["kvmesh", "gateway"]
    assert "--policy=prefix" in gw["args"] and "--deployment=smollm2" in gw["args"]
    assert gw["readinessProbe"]["grpc"]["port"] == 50051


def test_helm_template_options(kube: Any) -> None:
    docs = rendered(
        kube,
        "--set", "operator.replicaCount=2",
        "--set", "gateway.autoscaling.enabled=true",
        "--set", "redis.enabled=false",
        "--set", "redis.external.existingSecret=my-redis",
    )  # fmt: skip
    kinds = {d["kind"] for d in docs}
    assert {"HorizontalPodAutoscaler", "ClusterKopfPeering"} <= kinds
    assert not [d for d in docs if d["metadata"]["name"] == "kvmesh-redis"]  # no bundled Redis, no Secret
    operator = next(
        d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "kvmesh-operator"
    )
    args = operator["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--peering=kvmesh-operator" in args and "--redis-secret=my-redis:url" in args
    namespaced = rendered(kube, "--set", "operator.watchNamespaces={team-a,team-b}")
    roles = [d for d in namespaced if d["kind"] == "Role"]
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]


def test_helm_rejects_bad_values(kube: Any) -> None:
    for override in ("image.tag=latest", "gateway.policy=random", "operator.replicaCount=0", "unknownKey=1"):
        done = kube.helm("template", RELEASE, str(CHART), "--set", override, check=False)
        assert done.returncode != 0, override
    done = kube.helm("template", RELEASE, str(CHART), "--set", "redis.enabled=false", check=False)
    assert "redis.external.url or redis.external.existingSecret is required" in done.stderr


@pytest.fixture(scope="module")
def installed(kube: Any) -> Iterator[Any]:
    kube.helm("install", RELEASE, str(CHART), "--namespace", NAMESPACE, "--create-namespace")
    try:
        yield kube
    finally:
        kube.helm("uninstall", RELEASE, "--namespace", NAMESPACE, check=False)


def test_helm_install(installed: Any) -> None:
    status = json.loads(installed.helm("status", RELEASE, "--namespace", NAMESPACE, "-o", "json").stdout)
    assert status["info"]["status"] == "deployed"
    assert "kvmesh-operator" in installed.kubectl("get", "deployments", "-n", NAMESPACE).stdout
    installed.kubectl("get", f"crd/{crd.PLURAL}.{crd.GROUP}", "crd/clusterkopfpeerings.kopf.dev")
    secret = json.loads(
        installed.kubectl("get", "secret", "kvmesh-redis", "-n", NAMESPACE, "-o", "json").stdout
    )
    assert {"url", "password"} <= set(secret["data"])
    # Upgrading keeps the generated Redis password.
    installed.helm("upgrade", RELEASE, str(CHART), "--namespace", NAMESPACE)
    again = json.loads(
        installed.kubectl("get", "secret", "kvmesh-redis", "-n", NAMESPACE, "-o", "json").stdout
    )
    assert again["data"]["password"] == secret["data"]["password"]


def can_i(kube: Any, verb: str, resource: str, namespace: str = NAMESPACE) -> bool:
    who = f"--as=system:serviceaccount:{NAMESPACE}:{OPERATOR_SA}"
    resource, _, sub = resource.partition("/")
    extra = [f"--subresource={sub}"] if sub else []
    done = kube.kubectl("auth", "can-i", verb, resource, *extra, "-n", namespace, who, check=False)
    return done.stdout.strip() == "yes"


def test_operator_rbac_is_least_privilege(installed: Any) -> None:
    for verb, resource in (
        ("patch", "inferencedeployments.kvmesh.io"),
        ("patch", "inferencedeployments.kvmesh.io/status"),
        ("patch", "inferencedeployments.kvmesh.io/scale"),
        ("create", "deployments.apps"),
        ("patch", "poddisruptionbudgets.policy"),
        ("create", "events"),
    ):
        assert can_i(installed, verb, resource), (verb, resource)
    for verb, resource in (
        ("delete", "deployments.apps"),
        ("get", "secrets"),
        ("list", "pods"),
        ("create", "inferencedeployments.kvmesh.io"),
        ("delete", "inferencedeployments.kvmesh.io"),
        ("create", "roles.rbac.authorization.k8s.io"),
        ("list", "deployments.apps"),
        ("patch", "events"),
        ("get", "configmaps"),
        ("get", "inferencedeployments.kvmesh.io/status"),
    ):
        assert not can_i(installed, verb, resource), (verb, resource)


@pytest.mark.parametrize("scope", ["cluster-wide", "namespaced"])
def test_operator_with_chart_service_account_reconciles_without_forbidden(
    installed: Any, tmp_path: Path, scope: str
) -> None:
    if scope == "namespaced":
        # Roles in the watched namespace instead of cluster-wide rules.
        installed.helm(
            "upgrade",
            RELEASE,
            str(CHART),
            "--namespace",
            NAMESPACE,
            "--set",
            f"operator.watchNamespaces={{{NAMESPACE}}}",
        )
        assert can_i(installed, "patch", "deployments.apps")
        assert not can_i(installed, "patch", "deployments.apps", namespace="default")
    watch = "--all-namespaces" if scope == "cluster-wide" else f"--namespace={NAMESPACE}"
    redis = RedisServer(tmp_path)
    sa_kubeconfig = installed.sa_kubeconfig(NAMESPACE, OPERATOR_SA)
    operator = OperatorProcess(
        sa_kubeconfig, tmp_path / "operator.log", watch, f"--redis-url={redis.url}",
        "--redis-secret=kvmesh-redis:url", "--log-format=json",
    )  # fmt: skip
    try:
        operator.wait_healthy()
        installed.kubectl("apply", "-n", NAMESPACE, "-f", str(SAMPLES / "smollm2-cpu.yaml"))
        # An autoscaled one too, so the scale subresource and events are exercised under this identity.
        sample = yaml.safe_load((SAMPLES / "llama-8b-autoscaled.yaml").read_text())
        sample["spec"]["autoscaling"]["scaleUp"]["stabilizationWindowSeconds"] = 0
        installed.kubectl("apply", "-n", NAMESPACE, "-f", "-", input=json.dumps(sample))

        def get(kind: str, name: str) -> dict | None:
            done = installed.kubectl("get", kind, name, "-n", NAMESPACE, "-o", "json", check=False)
            return json.loads(done.stdout) if done.returncode == 0 else None

        def reconciled(name: str) -> dict | None:
            obj = get(crd.PLURAL, name)
            status = (obj or {}).get("status") or {}
            return obj if status.get("observedGeneration") and condition(obj, "Progressing") else None

        for name in ("smollm2", "llama-8b"):
            installed.wait_for(lambda n=name: reconciled(n), timeout=60, what=f"{name} reconciled")
            for kind in ("deployment", "service", "pdb"):
                installed.wait_for(lambda k=kind, n=name: get(k, f"{n}-worker"), timeout=30, what=f"{kind}")
        dep = get("deployment", "smollm2-worker")
        env = {e["name"]: e for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
        assert env["KVMESH_REDIS_URL"]["valueFrom"]["secretKeyRef"] == {"name": "kvmesh-redis", "key": "url"}

        def scaled() -> bool:
            load = (40, 40, 0.9)
            redis.report("llama-8b", {"w1": load, "w2": load})
            return get("deployment", "llama-8b-worker")["spec"]["replicas"] > 2

        installed.wait_for(scaled, timeout=60, interval=0.5, what="autoscaled under the chart's RBAC")
        installed.kubectl("scale", crd.PLURAL, "smollm2", "-n", NAMESPACE, "--replicas=2")
        installed.wait_for(lambda: get("deployment", "smollm2-worker")["spec"]["replicas"] == 2, timeout=30)
        log = operator.log()
        assert "Forbidden" not in log and " 403" not in log, log[-6000:]
        assert "Traceback" not in log, log[-6000:]
        # Structured logs: one JSON object per line, per-object lines name their object.
        records = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
        assert records and len(records) == len([x for x in log.splitlines() if x.strip()]), log[-3000:]
        applied = [
            r for r in records if str(r.get("message")).startswith("Applied InferenceDeployment children")
        ]
        assert applied and applied[0]["object"]["kind"] == "InferenceDeployment", applied[:1]
        # kopf retries (and logs as errors) the 429s of a CRD whose storage is still initializing.
        errors = [r for r in records if r["severity"] not in ("debug", "info")]
        assert all("storage is (re)initializing" in r["message"] for r in errors), errors
    finally:
        for name in ("smollm2", "llama-8b"):
            installed.kubectl("delete", crd.PLURAL, name, "-n", NAMESPACE, "--ignore-not-found", check=False)
        operator.stop()
        redis.stop()
        print(operator.log()[-6000:])
        if scope == "namespaced":
            installed.helm("upgrade", RELEASE, str(CHART), "--namespace", NAMESPACE, check=False)
