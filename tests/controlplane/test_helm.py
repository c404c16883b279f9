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


def containers(docs: list[dict]) -> list[dict]:
    return [c for d in docs if d["kind"] == "Deployment" for c in d["spec"]["template"]["spec"]["containers"]]


def named(docs: list[dict], kind: str, name: str) -> dict:
    return next(d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name)


def test_helm_template_defaults(kube: Any) -> None:
    docs = rendered(kube)
    kinds = sorted(f"{d['kind']}/{d['metadata']['name']}" for d in docs)
    assert kinds == [
        "ClusterRole/kvmesh-operator",
        "ClusterRoleBinding/kvmesh-operator",
        f"CustomResourceDefinition/{crd.PLURAL}.{crd.GROUP}",
        "Deployment/kvmesh-gateway",
        "Deployment/kvmesh-operator",
        "Deployment/kvmesh-redis",
        "PodDisruptionBudget/kvmesh-gateway",
        "Role/kvmesh-operator-leader",
        "RoleBinding/kvmesh-operator-leader",
        "Secret/kvmesh-redis",
        "Service/kvmesh-gateway",
        "Service/kvmesh-redis",
        "ServiceAccount/kvmesh-operator",
    ]
    for doc in docs:
        labels = doc["metadata"]["labels"]
        if doc["kind"] == "CustomResourceDefinition":
            assert doc == crd.crd_manifest()  # the generated file, as is
            continue
        assert labels["app.kubernetes.io/instance"] == RELEASE
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        assert "app.kubernetes.io/name" in labels and "helm.sh/chart" in labels
    for c in containers(docs):
        assert ":" in c["image"] and not c["image"].endswith(":latest"), c["image"]
    args = named(docs, "Deployment", "kvmesh-operator")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--all-namespaces" in args and f"--leader-election={NAMESPACE}/kvmesh-operator" in args
    assert "--redis-password-secret=kvmesh-redis:password" in args
    gateway = named(docs, "Deployment", "kvmesh-gateway")["spec"]["template"]["spec"]
    gw = gateway["containers"][0]
    assert gw["command"] == ["kvmesh", "gateway"]
    assert f"--deployment={NAMESPACE}/smollm2" in gw["args"]
    assert "--http-port=8000" in gw["args"] and "--max-connection-age=300" in gw["args"]
    gw_ports = {p["name"]: p["containerPort"] for p in gw["ports"]}
    assert gw_ports == {"grpc": 50051, "metrics": 9090, "http": 8000}
    service_ports = {p["name"]: p["port"] for p in named(docs, "Service", "kvmesh-gateway")["spec"]["ports"]}
    assert service_ports == {"grpc": 50051, "http": 8000, "metrics": 9090}
    # No routing flags: the gateway takes the InferenceDeployment's spec.routing.
    assert not [a for a in gw["args"] if a.startswith(("--policy", "--load-factor"))]
    assert gw["readinessProbe"]["grpc"]["port"] == 50051
    # Draining: preStop first, then the streams get the rest of the grace period.
    assert gw["lifecycle"]["preStop"] == {"sleep": {"seconds": 5}}
    assert "--shutdown-grace=50" in gw["args"] and gateway["terminationGracePeriodSeconds"] == 60
    pdb = named(docs, "PodDisruptionBudget", "kvmesh-gateway")
    assert pdb["spec"]["maxUnavailable"] == 1
    assert (
        pdb["spec"]["selector"]["matchLabels"]
        == named(docs, "Deployment", "kvmesh-gateway")["spec"]["selector"]["matchLabels"]
    )


def test_rendered_gateway_args_parse_with_the_gateway_cli(kube: Any) -> None:
    import argparse

    from kvmesh.gateway import cli as gateway_cli

    parser = argparse.ArgumentParser()
    gateway_cli.configure(parser)
    for extra in ([], ["--set", "gateway.policy=least-load", "--set", "gateway.loadFactor=1.5"]):
        gw = named(rendered(kube, *extra), "Deployment", "kvmesh-gateway")["spec"]["template"]["spec"]
        args = parser.parse_args(gw["containers"][0]["args"])
        assert (args.port, args.deployment) == (50051, f"{NAMESPACE}/smollm2")
        assert (args.policy, args.load_factor) == ((None, None) if not extra else ("least-load", 1.5))


PASSWORD = 'p@ss/w:rd "quoted" \\ back'


def test_redis_password_travels_by_env_never_argv_and_renders_stably(kube: Any) -> None:
    docs = rendered(kube, "--set-string", f"redis.auth.password={PASSWORD}")
    assert docs == rendered(kube, "--set-string", f"redis.auth.password={PASSWORD}")  # GitOps: stable
    secret = named(docs, "Secret", "kvmesh-redis")
    assert set(secret["data"]) == {"password"}
    for c in containers(docs):
        argv = " ".join([*c.get("command", []), *c.get("args", [])])
        assert PASSWORD not in argv and "p@ss" not in argv, c["name"]
        refs = [e for e in c.get("env", []) if "PASSWORD" in e["name"] and e["name"] != "REDISCLI_AUTH"]
        assert refs and all(e["valueFrom"]["secretKeyRef"]["name"] == "kvmesh-redis" for e in refs), c["name"]
    # An existing Secret: the chart renders none and everything reads that one.
    docs = rendered(
        kube,
        "--set",
        "redis.auth.existingSecret=ops-redis",
        "--set",
        "redis.auth.existingSecretPasswordKey=pw",
    )
    assert not [d for d in docs if d["kind"] == "Secret"]
    for c in containers(docs):
        for e in c.get("env", []):
            if "PASSWORD" in e["name"] or e["name"] == "REDISCLI_AUTH":
                assert e["valueFrom"]["secretKeyRef"] == {"name": "ops-redis", "key": "pw"}


def test_rendered_redis_starts_with_a_hard_password_it_never_shows(kube: Any, tmp_path: Path) -> None:
    """Run the chart's own Redis start command with a real redis-server: the password (quotes,
    backslash, URL-reserved characters) works, and no process's argv holds it."""
    import os
    import shutil
    import subprocess
    import time

    import redis

    from .cluster import free_port

    docs = rendered(kube, "--set-string", f"redis.auth.password={PASSWORD}")
    container = named(docs, "Deployment", "kvmesh-redis")["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["sh", "-c"]
    port = free_port()
    script = container["args"][0].replace("/run/redis", str(tmp_path)) + f" --port {port} --bind 127.0.0.1"
    script = script.replace("exec redis-server", f"exec {shutil.which('redis-server')}")
    proc = subprocess.Popen(
        ["sh", "-c", script], env={**os.environ, "REDIS_PASSWORD": PASSWORD}, cwd=tmp_path
    )
    try:
        client = redis.Redis(port=port, password=PASSWORD)
        deadline = time.monotonic() + 20
        while True:
            try:
                assert client.ping()
                break
            except redis.ConnectionError:
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.1)
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=port, password="wrong").ping()
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes()
        assert b"p@ss" not in cmdline and b"redis-server" in cmdline
    finally:
        proc.terminate()
        proc.wait(10)


def test_helm_template_options(kube: Any) -> None:
    docs = rendered(
        kube,
        "--set", "operator.replicaCount=2",
        "--set", "gateway.autoscaling.enabled=true",
        "--set", "redis.enabled=false",
        "--set", "redis.external.url=rediss://redis.example:6380/0",
        "--set", "redis.auth.existingSecret=my-redis",
        "--set", "crds.install=false",
        "--set", "metrics.podMonitor.enabled=true",
        "--set", "metrics.podMonitor.labels.release=prometheus",
        "--set", "gateway.additionalDeployments={qwen,llama}",
        "--set", "metrics.grafanaDashboard.enabled=true",
    )  # fmt: skip
    dashboard = named(docs, "ConfigMap", "kvmesh-grafana-dashboard")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dashboard["data"]["kvmesh.json"])["panels"]
    gateway = named(docs, "Deployment", "kvmesh-gateway")["spec"]["template"]["spec"]
    gateway_args = gateway["containers"][0]["args"]
    assert f"--deployment={NAMESPACE}/smollm2,{NAMESPACE}/qwen,{NAMESPACE}/llama" in gateway_args
    kinds = {d["kind"] for d in docs}
    assert "HorizontalPodAutoscaler" in kinds and "CustomResourceDefinition" not in kinds
    assert not [d for d in docs if d["metadata"]["name"] == "kvmesh-redis"]  # no bundled Redis, no Secret
    operator = named(docs, "Deployment", "kvmesh-operator")
    assert operator["spec"]["replicas"] == 2
    env = {e["name"]: e for e in operator["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["KVMESH_REDIS_URL"]["value"] == "rediss://redis.example:6380/0"
    assert env["KVMESH_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
        "name": "my-redis",
        "key": "password",
    }
    monitor = named(docs, "PodMonitor", "kvmesh")
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    assert monitor["spec"]["namespaceSelector"] == {"any": True}
    assert monitor["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
    selector = {e["key"]: e["values"] for e in monitor["spec"]["selector"]["matchExpressions"]}
    assert selector == {
        "app.kubernetes.io/part-of": ["kvmesh"],
        "app.kubernetes.io/component": ["gateway", "worker"],
    }
    namespaced = rendered(kube, "--set", "operator.watchNamespaces={team-a,team-b}")
    roles = [d for d in namespaced if d["kind"] == "Role" and d["metadata"]["name"] == "kvmesh-operator"]
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]


def test_helm_rejects_bad_values(kube: Any) -> None:
    for override in (
        "image.tag=latest",
        "gateway.policy=random",
        "operator.replicaCount=0",
        "unknownKey=1",
        "redis.external.url=redis://:secret@redis:6379/0",  # passwords never in values URLs
    ):
        done = kube.helm("template", RELEASE, str(CHART), "--set", override, check=False)
        assert done.returncode != 0, override
    done = kube.helm("template", RELEASE, str(CHART), "--set", "redis.enabled=false", check=False)
    assert "redis.external.url is required when redis.enabled is false" in done.stderr
    done = kube.helm(
        "template", RELEASE, str(CHART), "--set", "redis.enabled=false",
        "--set", "redis.external.url=redis://r:6379/0", check=False,
    )  # fmt: skip
    assert "needs redis.auth.existingSecret or redis.auth.password" in done.stderr


def old_chart(tmp_path: Path) -> Path:
    """The chart as the previous release shipped it: the CRD in crds/ (installed once, never
    upgraded by Helm), without spec.rollout."""
    import shutil

    copy = tmp_path / "kvmesh-old"
    shutil.copytree(CHART, copy)
    (copy / "templates" / "crds.yaml").unlink()
    manifest = crd.crd_manifest()
    del manifest["metadata"]["annotations"]
    del manifest["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"][
        "rollout"
    ]
    (copy / "crds").mkdir()
    (copy / "crds" / "inferencedeployments.kvmesh.io.yaml").write_text(yaml.safe_dump(manifest))
    return copy


CRD_NAME = f"{crd.PLURAL}.{crd.GROUP}"
# The documented step before upgrading from a chart that shipped the CRD in crds/ (docs/operator.md):
# hand the existing CRD to the release, so the template can upgrade it.
ADOPT = (
    ("label", "crd", CRD_NAME, "app.kubernetes.io/managed-by=Helm", "--overwrite"),
    (
        "annotate", "crd", CRD_NAME, f"meta.helm.sh/release-name={RELEASE}",
        f"meta.helm.sh/release-namespace={NAMESPACE}", "--overwrite",
    ),
)  # fmt: skip


def crd_spec_fields(kube: Any) -> set[str]:
    done = kube.kubectl("get", "crd", CRD_NAME, "-o", "json")
    schema = json.loads(done.stdout)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return set(schema["properties"]["spec"]["properties"])


@pytest.fixture(scope="module")
def installed(kube: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    # Install the previous release first (on a cluster without the CRD): the upgrade to this chart
    # must upgrade the CRD.
    kube.kubectl("delete", "crd", CRD_NAME, "--ignore-not-found", "--wait=true")
    old = old_chart(tmp_path_factory.mktemp("chart"))
    kube.helm("install", RELEASE, str(old), "--namespace", NAMESPACE, "--create-namespace")
    try:
        yield kube
    finally:
        kube.helm("uninstall", RELEASE, "--namespace", NAMESPACE, check=False)


def test_helm_install_and_upgrade_upgrade_the_crd(installed: Any) -> None:
    assert "rollout" not in crd_spec_fields(installed)
    secret = json.loads(
        installed.kubectl("get", "secret", "kvmesh-redis", "-n", NAMESPACE, "-o", "json").stdout
    )
    assert set(secret["data"]) == {"password"}
    for step in ADOPT:
        installed.kubectl(*step)
    installed.helm("upgrade", RELEASE, str(CHART), "--namespace", NAMESPACE)
    status = json.loads(installed.helm("status", RELEASE, "--namespace", NAMESPACE, "-o", "json").stdout)
    assert status["info"]["status"] == "deployed"
    assert "kvmesh-operator" in installed.kubectl("get", "deployments", "-n", NAMESPACE).stdout
    # `helm upgrade` upgraded the CRD (files in crds/ would have stayed as installed).
    assert "rollout" in crd_spec_fields(installed)
    # A rollout setting is stored, not pruned.
    obj = yaml.safe_load((SAMPLES / "qwen-32b-pvc.yaml").read_text())
    out = json.loads(
        installed.kubectl(
            "apply", "--dry-run=server", "-n", NAMESPACE, "-o", "json", "-f", "-", input=json.dumps(obj)
        ).stdout
    )
    assert out["spec"]["rollout"]["maxSurge"] == 0
    # Upgrading keeps the generated Redis password.
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
        ("watch", "deployments.apps"),
        ("watch", "services"),
        ("patch", "poddisruptionbudgets.policy"),
        ("create", "events"),
        ("create", "leases.coordination.k8s.io"),
    ):
        assert can_i(installed, verb, resource), (verb, resource)
    for verb, resource in (
        ("delete", "deployments.apps"),
        ("get", "secrets"),
        ("list", "pods"),
        ("create", "inferencedeployments.kvmesh.io"),
        ("delete", "inferencedeployments.kvmesh.io"),
        ("create", "roles.rbac.authorization.k8s.io"),
        ("delete", "leases.coordination.k8s.io"),
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
        "--redis-password-secret=kvmesh-redis:password", "--log-format=json",
        f"--leader-election={NAMESPACE}/kvmesh-operator", "--leader-identity=test",
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
        assert env["KVMESH_REDIS_URL"] == {"name": "KVMESH_REDIS_URL", "value": redis.url}
        assert env["KVMESH_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
            "name": "kvmesh-redis",
            "key": "password",
        }

        def scaled() -> bool:
            load = (40, 40, 0.9)
            redis.report("llama-8b", {"w1": load, "w2": load}, namespace=NAMESPACE)
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


def test_uninstall_keeps_the_crd_and_the_generated_password(installed: Any) -> None:
    """`helm uninstall` must not delete every InferenceDeployment (with the CRD) nor mint a new Redis
    password on reinstall that running workers would not know."""
    installed.helm("uninstall", RELEASE, "--namespace", NAMESPACE)
    installed.kubectl("get", "crd", f"{crd.PLURAL}.{crd.GROUP}")
    installed.kubectl("get", "secret", "kvmesh-redis", "-n", NAMESPACE)
