"""The `kube` fixture runs a real control plane: API, RBAC, controllers and garbage collection."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from .cluster import REPO_ROOT, Binaries, Cluster, ClusterError, read_versions

pytestmark = pytest.mark.controlplane


def _namespace(kube: Cluster, prefix: str) -> str:
    name = f"{prefix}-{uuid.uuid4().hex[:6]}"
    kube.kubectl("create", "namespace", name)
    return name


def test_api_server_answers(kube: Cluster) -> None:
    version = json.loads(kube.kubectl("version", "-o", "json").stdout)
    assert version["serverVersion"]["gitVersion"] == read_versions()["KUBERNETES_VERSION"]
    namespaces = kube.kubectl("get", "namespaces", "-o", "name").stdout.split()
    assert {"namespace/default", "namespace/kube-system"} <= set(namespaces)
    assert kube.server.startswith("https://127.0.0.1:")


def test_rbac_forbids_a_service_account_without_permissions(kube: Cluster) -> None:
    ns = _namespace(kube, "rbac")
    kube.kubectl("create", "serviceaccount", "nobody", "-n", ns)
    kube.kubectl("create", "secret", "generic", "s", "--from-literal=k=v", "-n", ns)
    as_sa = [f"--kubeconfig={kube.sa_kubeconfig(ns, 'nobody')}", "-n", ns]

    who = json.loads(kube.kubectl(*as_sa, "auth", "whoami", "-o", "json").stdout)
    assert who["status"]["userInfo"]["username"] == f"system:serviceaccount:{ns}:nobody"
    denied = kube.kubectl(*as_sa, "get", "secrets", check=False)
    assert denied.returncode != 0
    assert "Forbidden" in denied.stderr

    # Granting the permission through RBAC is what makes the same request pass.
    kube.kubectl("create", "role", "read-secrets", "--verb=list", "--resource=secrets", "-n", ns)
    kube.kubectl(
        "create", "rolebinding", "read-secrets", "--role=read-secrets",
        f"--serviceaccount={ns}:nobody", "-n", ns,
    )  # fmt: skip
    allowed = kube.wait_for(
        lambda: kube.kubectl(*as_sa, "get", "secrets", "-o", "name", check=False).stdout.split(),
        timeout=20,
        what="the RoleBinding to take effect",
    )
    assert allowed == ["secret/s"]


def test_sa_kubeconfig_needs_an_existing_service_account(kube: Cluster) -> None:
    with pytest.raises(subprocess.CalledProcessError):
        kube.sa_kubeconfig("default", "does-not-exist")


def test_deployment_gets_a_replicaset(kube: Cluster) -> None:
    ns = _namespace(kube, "deploy")
    kube.kubectl("create", "deployment", "web", "--image=registry.invalid/web:1", "--replicas=2", "-n", ns)

    def replicasets() -> list[dict]:
        return kube.kubectl_json("get", "replicasets", "-n", ns, "-l", "app=web")["items"]

    (rs,) = kube.wait_for(replicasets, timeout=60, what="the Deployment's ReplicaSet")
    assert rs["metadata"]["ownerReferences"][0]["kind"] == "Deployment"
    assert rs["spec"]["replicas"] == 2

    # No scheduler or kubelet runs: the ReplicaSet's pods exist but stay Pending.
    def pods() -> list[dict]:
        items = kube.kubectl_json("get", "pods", "-n", ns, "-l", "app=web")["items"]
        return items if len(items) == 2 else []

    phases = {p["status"].get("phase") for p in kube.wait_for(pods, timeout=60, what="the ReplicaSet's pods")}
    assert phases == {"Pending"}


def test_deleting_an_owner_garbage_collects_its_dependent(kube: Cluster) -> None:
    ns = _namespace(kube, "gc")
    kube.kubectl("create", "configmap", "owner", "-n", ns)
    owner_uid = kube.kubectl_json("get", "configmap", "owner", "-n", ns)["metadata"]["uid"]
    owner_ref = {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner_uid}
    kube.apply(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "dependent", "namespace": ns, "ownerReferences": [owner_ref]},
        }
    )
    kube.kubectl("delete", "configmap", "owner", "-n", ns, "--wait=true")

    def dependent_gone() -> bool:
        got = kube.kubectl("get", "configmap", "dependent", "-n", ns, check=False)
        return got.returncode != 0 and "NotFound" in got.stderr

    assert kube.wait_for(dependent_gone, timeout=60, what="garbage collection of the dependent")


def test_helm_reaches_the_cluster(kube: Cluster) -> None:
    assert kube.helm("version", "--template", "{{.Version}}").stdout.startswith("v4.")
    assert kube.helm("list", "--all-namespaces", "-o", "json").stdout.strip() == "[]"


def test_missing_binaries_name_the_build_script(tmp_path) -> None:
    binaries = Binaries(root=tmp_path)
    with pytest.raises(ClusterError, match=r"scripts/controlplane/build\.sh"):
        binaries.require()


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


@pytest.mark.slow
def test_stop_ends_every_process_and_removes_its_files(kube: Cluster) -> None:
    cluster = Cluster(keep=False).start()
    pids = [p.pid for p in cluster._procs.values()]
    assert len(pids) == 3 and all(map(_alive, pids))
    cluster.stop()
    assert not any(map(_alive, pids))
    assert not cluster.dir.exists()


@pytest.mark.slow
def test_a_killed_test_process_takes_the_control_plane_with_it(kube: Cluster, tmp_path: Path) -> None:
    # A pytest killed with SIGKILL runs no finalizer: the children must still go (PR_SET_PDEATHSIG).
    script = (
        "import json, sys, time\n"
        "from tests.controlplane.cluster import Cluster\n"
        "c = Cluster().start()\n"
        "print(json.dumps({'dir': str(c.dir), 'pids': [p.pid for p in c._procs.values()]}), flush=True)\n"
        "time.sleep(600)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
    try:
        started = json.loads(proc.stdout.readline())
    finally:
        proc.kill()
        proc.wait()
    try:
        kube.wait_for(lambda: not any(map(_alive, started["pids"])), timeout=30, what="the orphans to exit")
    finally:
        shutil.rmtree(started["dir"], ignore_errors=True)
