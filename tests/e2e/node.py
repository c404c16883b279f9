"""A real single-node Kubernetes cluster on this machine, for the e2e suite.

Beside the control plane of tests/controlplane/cluster.py (etcd, kube-apiserver, kube-controller-manager)
`Node` runs, each in its own process group:

- containerd and runc from Debian's packages, with the CNI bridge, host-local, portmap and loopback plugins
  of `containernetworking-plugins`: pods get addresses in 10.244.0.0/24 on the bridge `kvmesh0`, whose
  address 10.244.0.1 is also the node's and the API server's (nothing listens beyond this machine);
- kube-scheduler, a kubelet (cgroup v1 allowed explicitly: `failCgroupV1: false`) and kube-proxy (iptables
  mode, NodePorts on the node address only), all built from the same `k8s.io/kubernetes` module;
- CoreDNS as a Deployment behind the `kube-dns` Service at 10.0.0.10 (pods resolve Service names such as
  the chart's Redis).

Images come from scripts/images/build.sh (buildah, no registry) and are imported into containerd under the
names the chart uses. containerd's image store persists under $KVMESH_CACHE/containerd, so an image is
imported once per build. Needs root (network namespaces, cgroups, iptables).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
from pathlib import Path

from tests.controlplane.cluster import REPO_ROOT, Cluster, ClusterError, cache_dir, free_port

from . import addons

BRIDGE = "kvmesh0"
POD_CIDR = "10.244.0.0/24"
NODE_IP = "10.244.0.1"
NODE_NAME = "kvmesh-node"
CNI_BIN = Path("/usr/lib/cni")
CONTAINERD_STATE = Path("/run/kvmesh-containerd")


def host_network_up() -> None:
    """The bridge holding the node address (before the API server binds it) and the kernel settings."""
    if subprocess.run(["ip", "link", "show", BRIDGE], capture_output=True).returncode != 0:
        _sh("ip", "link", "add", BRIDGE, "type", "bridge")
    addrs = _sh("ip", "-o", "-4", "addr", "show", "dev", BRIDGE)
    if f"{NODE_IP}/" not in addrs:
        _sh("ip", "addr", "add", f"{NODE_IP}/24", "dev", BRIDGE)
    _sh("ip", "link", "set", BRIDGE, "up")
    for key in ("net/ipv4/ip_forward", "net/bridge/bridge-nf-call-iptables"):
        Path("/proc/sys", key).write_text("1\n")


def _sh(*cmd: str, check: bool = True, timeout: float = 60) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise ClusterError(f"{' '.join(cmd)} failed: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout


def require_node_tools(cluster: Cluster) -> None:
    b = cluster.binaries
    missing = [
        str(p) for p in (b.kube_scheduler, b.kubelet, b.kube_proxy, b.coredns) if not os.access(p, os.X_OK)
    ]
    missing += [
        t
        for t in ("containerd", "containerd-shim-runc-v2", "runc", "ctr", "iptables", "buildah")
        if shutil.which(t) is None
    ]
    missing += [
        str(CNI_BIN / p)
        for p in ("bridge", "host-local", "portmap", "loopback")
        if not (CNI_BIN / p).exists()
    ]
    if os.geteuid() != 0:
        missing.append("root (the kubelet and containerd need it)")
    if missing:
        raise ClusterError(f"the e2e node needs: {', '.join(missing)}; run `scripts/bootstrap.sh --test`")


class Node:
    """containerd, kube-scheduler, a kubelet, kube-proxy and CoreDNS beside a started `Cluster`."""

    def __init__(self, cluster: Cluster):
        self.cluster = cluster
        self.dir = cluster.dir / "node"
        self.dir.mkdir(exist_ok=True)
        self.root = cache_dir() / "containerd"
        self.sock = CONTAINERD_STATE / "containerd.sock"

    def start(self, timeout: float = 300.0) -> Node:
        require_node_tools(self.cluster)
        self._lock()
        self._unmount(stale=True)
        self._start_containerd(timeout)
        self._clean_stale_pods()
        self.import_images()
        self._start_scheduler()
        self._start_kubelet()
        self._start_kube_proxy()
        self.cluster.wait_for(self._node_ready, timeout, interval=1.0, what=f"node {NODE_NAME} Ready")
        addons.install_coredns(self.cluster, timeout)
        return self

    def stop(self) -> None:
        """Deletes every pod through the kubelet (so CNI releases its addresses), then stops everything."""
        with contextlib.suppress(Exception):
            self.cluster.kubectl(
                "delete",
                "pods",
                "--all",
                "-A",
                "--grace-period=0",
                "--force",
                "--wait=false",
                check=False,
                timeout=30,
            )
            self.cluster.wait_for(lambda: not self._tasks(), 60, interval=1.0, what="containers gone")
        for name in ("kube-proxy", "kubelet", "kube-scheduler"):
            proc = self.cluster._procs.pop(name, None)
            if proc is not None:
                self.cluster._terminate(proc)
        self._clean_stale_pods()
        self._unmount()
        with contextlib.suppress(Exception):
            _sh(str(self.cluster.binaries.kube_proxy), "--cleanup", check=False)
        proc = self.cluster._procs.pop("containerd", None)
        if proc is not None:
            self.cluster._terminate(proc)
        for line in reversed(Path("/proc/mounts").read_text().splitlines()):  # sandboxes' /dev/shm
            if line.split()[1].startswith(f"{CONTAINERD_STATE}/"):
                _sh("umount", "--lazy", line.split()[1], check=False)

    def _unmount(self, *, stale: bool = False) -> None:
        """The kubelet bind-mounts its root directory and the pods' volumes under it: unmount them all
        (stale: those a killed run left under another cluster directory, and those directories)."""
        mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
        mine = f"{self.dir}/"
        leftovers = set()
        for target in reversed(mounts):
            if stale and "/kvmesh-kube-" in target and "/node/" in target and not target.startswith(mine):
                leftovers.add(target.split("/node/")[0])
            elif stale or not target.startswith(mine):
                continue
            _sh("umount", "--lazy", target, check=False)
        for directory in leftovers:
            shutil.rmtree(directory, ignore_errors=True)

    # ---- containerd ------------------------------------------------------------------------------
    def _lock(self) -> None:
        import fcntl

        self.root.mkdir(parents=True, exist_ok=True)
        self._lock_file = open(self.root / ".lock", "w")  # noqa: SIM115 (held for the node's lifetime)
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ClusterError(f"another e2e node uses {self.root}") from None

    def ctr(self, *args: str, check: bool = True, timeout: float = 600) -> str:
        return _sh("ctr", f"--address={self.sock}", "--namespace=k8s.io", *args, check=check, timeout=timeout)

    def _start_containerd(self, timeout: float) -> None:
        cni_conf = self.dir / "cni"
        cni_conf.mkdir(exist_ok=True)
        (cni_conf / "10-kvmesh.conflist").write_text(json.dumps(self._cni_config(), indent=2))
        config = self.dir / "containerd.toml"
        config.write_text(
            f"""version = 2
root = "{self.root / "root"}"
state = "{CONTAINERD_STATE}"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
                    "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs"]
[grpc]
  address = "{self.sock}"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{addons.PAUSE_IMAGE}"
  # Sandboxed CI machines may lack CAP_SYS_RESOURCE: never ask runc for an oom_score_adj below containerd's
  # own (the kubelet asks -998 for sandboxes), as rootless setups do.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{CNI_BIN}"
    conf_dir = "{cni_conf}"
"""
        )
        self.cluster._spawn("containerd", ["containerd", f"--config={config}", "--log-level=warn"])
        self.cluster._wait_ready("containerd", lambda: self.ctr("version", check=False) != "", timeout)

    def _cni_config(self) -> dict:
        bridge = {
            "type": "bridge",
            "bridge": BRIDGE,
            "isGateway": True,
            "ipMasq": True,
            "hairpinMode": True,  # a pod reaching itself through a Service
            "ipam": {
                "type": "host-local",
                "ranges": [[{"subnet": POD_CIDR, "gateway": NODE_IP}]],
                "routes": [{"dst": "0.0.0.0/0"}],
                "dataDir": str(self.dir / "ipam"),
            },
        }
        portmap = {"type": "portmap", "capabilities": {"portMappings": True}}
        return {"cniVersion": "0.4.0", "name": "kvmesh", "plugins": [bridge, portmap]}

    def _tasks(self) -> list[str]:
        return self.ctr("tasks", "ls", "-q", check=False).split()

    def _clean_stale_pods(self) -> None:
        """Containers left by a run that died: killed and removed with their network namespaces."""
        for task in self._tasks():
            self.ctr("tasks", "kill", "--signal=SIGKILL", task, check=False, timeout=30)
            self.ctr("tasks", "delete", "--force", task, check=False, timeout=30)
        containers = self.ctr("containers", "ls", "-q", check=False).split()
        if containers:
            self.ctr("containers", "delete", *containers, check=False)
        for ns in Path("/run/netns").glob("cni-*"):
            _sh("ip", "netns", "delete", ns.name, check=False)

    def import_images(self) -> None:
        """Builds (or finds cached) the images and imports each archive once under its chart name."""
        for _attempt in range(2):
            missing = self._import_built(self._build_images())
            if not missing:
                self._drop_unnamed_images()
                return
            # Imported into a containerd store that has since gone: forget them and build them again.
            for stamp in missing:
                stamp.unlink(missing_ok=True)
        raise ClusterError(f"images missing after a rebuild: {missing}")

    @staticmethod
    def _build_images() -> list[str]:
        done = subprocess.run(
            ["bash", str(REPO_ROOT / "scripts" / "images" / "build.sh")], capture_output=True, text=True
        )
        if done.returncode != 0:
            raise ClusterError(f"scripts/images/build.sh failed:\n{done.stderr[-4000:]}")
        return done.stdout.splitlines()

    def _import_built(self, lines: list[str]) -> list[Path]:
        """Imports what is not in containerd yet; returns the stamps of images it cannot find anywhere."""
        present = set(self.ctr("images", "ls", "-q").split())
        missing = []
        for line in lines:
            name, archive, key = line.split("\t")
            stamp = Path(archive).with_suffix(".imported")
            short = stamp.stem.rsplit("-", 1)[0]
            marker = f"kvmesh.local/built/{short}:{key}"  # one tag per build
            if marker in present and name in present:
                continue
            if not Path(archive).exists():
                missing.append(stamp)
                continue
            self.ctr("images", "import", archive, timeout=900)
            self.ctr("images", "tag", "--force", name, marker)
            stamp.touch()
            Path(archive).unlink()  # containerd holds it now; the stamp keeps build.sh from rebuilding
            # Earlier builds' tags would keep their layers in the store forever.
            for old in present:
                if old.startswith(f"kvmesh.local/built/{short}:") and old != marker:
                    self.ctr("images", "rm", old, check=False)
        return missing

    def _drop_unnamed_images(self) -> None:
        """Removes ``sha256:<id>`` references that no named image shares a digest with. containerd's
        CRI plugin keeps such a reference to every image it has seen, so once a new build takes a
        name, that reference alone would keep the old build's layers (5 GB for the worker) forever."""
        rows = [line.split() for line in self.ctr("images", "ls").splitlines()[1:]]
        named = {row[2] for row in rows if len(row) > 2 and not row[0].startswith("sha256:")}
        stale = [row[0] for row in rows if row[0].startswith("sha256:") and row[2] not in named]
        if stale:
            self.ctr("images", "rm", *stale, check=False)

    # ---- Kubernetes components -------------------------------------------------------------------
    def _start_scheduler(self) -> None:
        kubeconfig = self.cluster.component_kubeconfig("scheduler", "/CN=system:kube-scheduler")
        self.cluster._spawn(
            "kube-scheduler",
            [
                self.cluster.binaries.kube_scheduler,
                f"--kubeconfig={kubeconfig}",
                f"--authentication-kubeconfig={kubeconfig}",
                f"--authorization-kubeconfig={kubeconfig}",
                "--bind-address=127.0.0.1",
                f"--secure-port={free_port()}",
                "--leader-elect=false",
                "--v=1",
            ],
        )

    def _start_kubelet(self) -> None:
        pki = self.cluster.pki
        kubeconfig = self.cluster.component_kubeconfig(
            "kubelet", f"/O=system:nodes/CN=system:node:{NODE_NAME}"
        )
        serving = pki.issue("kubelet-serving", f"/CN={NODE_NAME}", server_names=[NODE_IP, NODE_NAME])
        config = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "address": NODE_IP,
            "port": free_port(),
            "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1",
            "healthzPort": free_port(),
            "tlsCertFile": str(serving[0]),
            "tlsPrivateKeyFile": str(serving[1]),
            "authentication": {
                "anonymous": {"enabled": False},
                "webhook": {"enabled": True},
                "x509": {"clientCAFile": str(pki.ca_crt)},
            },
            "authorization": {"mode": "Webhook"},
            "containerRuntimeEndpoint": f"unix://{self.sock}",
            "cgroupDriver": "cgroupfs",
            "failCgroupV1": False,  # cgroup v1 hosts: Kubernetes >= 1.35 refuses them by default
            "failSwapOn": False,
            "clusterDNS": [addons.DNS_IP],
            "clusterDomain": "cluster.local",
            # Imported images have no registry to come back from: never garbage-collect them, never evict.
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "evictionHard": {
                "memory.available": "100Mi",
                "nodefs.available": "1%",
                "imagefs.available": "1%",
            },
            "serializeImagePulls": False,
            "syncFrequency": "10s",
        }
        path = self.dir / "kubelet.json"
        path.write_text(json.dumps(config, indent=2))
        self.cluster._spawn(
            "kubelet",
            [
                self.cluster.binaries.kubelet,
                f"--config={path}",
                f"--kubeconfig={kubeconfig}",
                f"--hostname-override={NODE_NAME}",
                f"--node-ip={NODE_IP}",
                f"--root-dir={self.dir / 'kubelet'}",
                f"--cert-dir={self.dir / 'kubelet-pki'}",
                "--v=1",
            ],
        )

    def _start_kube_proxy(self) -> None:
        kubeconfig = self.cluster.component_kubeconfig("kube-proxy", "/CN=system:kube-proxy")
        config = {
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
            "kind": "KubeProxyConfiguration",
            "mode": "iptables",
            "clientConnection": {"kubeconfig": str(kubeconfig)},
            "hostnameOverride": NODE_NAME,
            "clusterCIDR": POD_CIDR,
            "nodePortAddresses": [f"{NODE_IP}/32"],
            "healthzBindAddress": f"127.0.0.1:{free_port()}",
            "metricsBindAddress": f"127.0.0.1:{free_port()}",
            "conntrack": {"maxPerCore": 0},  # leave the host's conntrack table size alone
        }
        path = self.dir / "kube-proxy.json"
        path.write_text(json.dumps(config, indent=2))
        self.cluster._spawn("kube-proxy", [self.cluster.binaries.kube_proxy, f"--config={path}", "--v=1"])

    def _node_ready(self) -> bool:
        for name in ("kubelet", "kube-proxy", "kube-scheduler", "containerd"):
            self.cluster._check_alive(name)
        done = self.cluster.kubectl("get", "node", NODE_NAME, "-o", "json", check=False)
        if done.returncode != 0:
            return False
        conditions = json.loads(done.stdout)["status"].get("conditions", [])
        return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)

    # ---- diagnostics -----------------------------------------------------------------------------
    def diagnostics(self, namespace: str | None = None) -> str:
        """What the cluster says: pods, events, pod logs, the kubelet's last lines."""
        ns = ["-n", namespace] if namespace else ["-A"]
        parts = []
        for args in (["get", "pods", "-o", "wide", *ns], ["get", "events", "--sort-by=.lastTimestamp", *ns]):
            done = self.cluster.kubectl(*args, check=False)
            parts.append(f"$ kubectl {' '.join(args)}\n{done.stdout}{done.stderr}")
        pods = self.cluster.kubectl("get", "pods", *ns, "-o", "json", check=False)
        if pods.returncode == 0:
            for pod in json.loads(pods.stdout)["items"]:
                meta = pod["metadata"]
                logs = self.cluster.kubectl(
                    "logs",
                    meta["name"],
                    "-n",
                    meta["namespace"],
                    "--all-containers",
                    "--tail=30",
                    check=False,
                )
                parts.append(f"--- logs {meta['namespace']}/{meta['name']}\n{logs.stdout}{logs.stderr}")
        parts.append(f"--- kubelet\n{self.cluster.log_tail('kubelet', 30)}")
        return "\n".join(parts)
