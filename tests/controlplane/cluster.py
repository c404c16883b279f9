"""A real, throwaway Kubernetes control plane on loopback for tests.

`Cluster.start()` runs etcd, kube-apiserver (TLS on 127.0.0.1, Node+RBAC authorization, client
certificates, service-account tokens) and kube-controller-manager (Deployments get ReplicaSets,
ownerReferences are garbage-collected) from the binaries that `scripts/controlplane/build.sh` builds,
writes an admin kubeconfig and waits until the API is ready. There is no scheduler and no kubelet, so
pods stay Pending (tests/e2e/node.py adds a real node beside it). `Cluster.stop()` kills every process
group and removes the temporary directory.

Certificates and keys come from the `openssl` CLI; versions and cache paths come from
`scripts/controlplane/versions.env`, the same file the build script reads.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

REPO_ROOT = Path(__file__).resolve().parents[2]
VERSIONS_FILE = REPO_ROOT / "scripts" / "controlplane" / "versions.env"
BUILD_HINT = "run scripts/controlplane/build.sh and scripts/install-helm.sh (or `make test`, which runs both)"
SYSTEM_KUBECTL = Path("/usr/bin/kubectl")
SERVICE_CIDR = "10.0.0.0/24"
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"

T = TypeVar("T")


class ClusterError(RuntimeError):
    """The control plane could not be found, started or used."""


def read_versions(path: Path = VERSIONS_FILE) -> dict[str, str]:
    """KEY=value lines of versions.env (comments and blank lines ignored)."""
    versions = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            versions[key.strip()] = value.strip()
    return versions


def cache_dir() -> Path:
    return Path(os.environ.get("KVMESH_CACHE") or Path.home() / ".cache" / "kvmesh")


class Binaries:
    """Where build.sh and install-helm.sh put each binary, for the versions in versions.env."""

    def __init__(self, versions: dict[str, str] | None = None, root: Path | None = None):
        self.versions = versions or read_versions()
        bin_dir = (root or cache_dir()) / "bin"
        k8s = bin_dir / f"k8s-{self.versions['KUBERNETES_VERSION']}"
        helm = bin_dir / f"helm-{self.versions['HELM_VERSION']}"
        self.etcd = bin_dir / f"etcd-{self.versions['ETCD_VERSION']}" / "etcd"
        self.kube_apiserver = k8s / "kube-apiserver"
        self.kube_controller_manager = k8s / "kube-controller-manager"
        # The node's binaries (tests/e2e): same Kubernetes build, CoreDNS beside etcd.
        self.kube_scheduler = k8s / "kube-scheduler"
        self.kubelet = k8s / "kubelet"
        self.kube_proxy = k8s / "kube-proxy"
        self.coredns = bin_dir / f"coredns-{self.versions['COREDNS_VERSION']}" / "coredns"
        self.helm = helm / "helm"
        # kubectl of the server's minor release (shipped with helm) keeps within the version-skew
        # policy; the system kubectl is the fallback.
        self.kubectl = helm / "kubectl" if (helm / "kubectl").exists() else SYSTEM_KUBECTL

    def missing(self) -> list[Path]:
        required = [self.etcd, self.kube_apiserver, self.kube_controller_manager, self.helm, self.kubectl]
        return [p for p in required if not os.access(p, os.X_OK)]

    def require(self) -> None:
        missing = self.missing()
        if missing:
            names = ", ".join(str(p) for p in missing)
            raise ClusterError(f"control-plane binaries not found: {names}; {BUILD_HINT}")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved here: the child must not load libraries


def _die_with_parent() -> None:
    # Runs in the child before exec: if the test process dies without cleaning up (SIGKILL), the kernel
    # kills the control-plane process instead of leaving it running. SIGKILL, not SIGTERM: all of them
    # get it at once, and a kube-apiserver shutting down gracefully after etcd is gone never finishes.
    _prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class _Pki:
    """A throwaway CA with the serving, client and service-account keys the control plane needs."""

    def __init__(self, directory: Path):
        self.dir = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.ca_crt, self.ca_key = directory / "ca.crt", directory / "ca.key"
        self._openssl(
            "req", "-x509", "-new", "-nodes", *self._ec_key(self.ca_key),
            "-out", self.ca_crt, "-days", "7", "-subj", "/CN=kvmesh-test-ca",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign,digitalSignature",
        )  # fmt: skip
        self.sa_key, self.sa_pub = directory / "sa.key", directory / "sa.pub"
        self._openssl("genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", self.sa_key)
        self._openssl("pkey", "-in", self.sa_key, "-pubout", "-out", self.sa_pub)

    @staticmethod
    def _ec_key(path: Path) -> list[Any]:
        return ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-keyout", path]

    def _openssl(self, *args: Any) -> None:
        cmd = ["openssl", *map(str, args)]
        done = subprocess.run(cmd, cwd=self.dir, capture_output=True, text=True)
        if done.returncode != 0:
            raise ClusterError(f"{' '.join(cmd)} failed: {done.stderr.strip()}")

    def issue(self, name: str, subject: str, *, server_names: Sequence[str] = ()) -> tuple[Path, Path]:
        """A key and a certificate signed by the CA; a server certificate when server_names are given."""
        key, csr, crt = self.dir / f"{name}.key", self.dir / f"{name}.csr", self.dir / f"{name}.crt"
        ext = self.dir / f"{name}.ext"
        lines = ["basicConstraints=critical,CA:FALSE", "keyUsage=critical,digitalSignature,keyEncipherment"]
        if server_names:
            sans = ",".join(f"IP:{n}" if n[0].isdigit() else f"DNS:{n}" for n in server_names)
            lines += ["extendedKeyUsage=serverAuth", f"subjectAltName={sans}"]
        else:
            lines += ["extendedKeyUsage=clientAuth"]
        ext.write_text("\n".join(lines) + "\n")
        self._openssl("req", "-new", "-nodes", *self._ec_key(key), "-out", csr, "-subj", subject)
        self._openssl(
            "x509", "-req", "-in", csr, "-CA", self.ca_crt, "-CAkey", self.ca_key, "-CAcreateserial",
            "-out", crt, "-days", "7", "-extfile", ext,
        )  # fmt: skip
        return crt, key


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def write_kubeconfig(path: Path, server: str, ca: Path, user: dict[str, str], name: str = "kvmesh") -> Path:
    """A kubeconfig (JSON, which every kubeconfig reader accepts as YAML) with embedded credentials."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": name, "cluster": {"server": server, "certificate-authority-data": _b64(ca)}}],
        "users": [{"name": name, "user": user}],
        "contexts": [{"name": name, "context": {"cluster": name, "user": name, "namespace": "default"}}],
        "current-context": name,
    }
    path.write_text(json.dumps(config, indent=2) + "\n")
    path.chmod(0o600)
    return path


class Cluster:
    """etcd + kube-apiserver + kube-controller-manager on loopback, with kubectl and helm helpers."""

    def __init__(
        self, binaries: Binaries | None = None, *, keep: bool | None = None, host: str = "127.0.0.1"
    ):
        self.binaries = binaries or Binaries()
        # The API's address. Loopback unless pods must reach it (a node's bridge address, tests/e2e).
        self.host = host
        self.keep = os.environ.get("KVMESH_KEEP_CLUSTER") == "1" if keep is None else keep
        self.dir = Path(tempfile.mkdtemp(prefix="kvmesh-kube-"))
        self.log_dir = self.dir / "logs"
        self.log_dir.mkdir()
        self.port = free_port()
        self.server = f"https://{host}:{self.port}"
        self.kubeconfig = self.dir / "admin.kubeconfig"
        self.kubectl_path = self.binaries.kubectl
        self.helm_path = self.binaries.helm
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._pki: _Pki | None = None
        self._stopped = False
        atexit.register(self.stop)  # removes the directory even if start() is never called
        # Everything a kubectl/helm/operator subprocess needs, with caches kept out of $HOME.
        self.env = {
            **os.environ,
            "KUBECONFIG": str(self.kubeconfig),
            "KUBECACHEDIR": str(self.dir / "kube-cache"),
            "HELM_CACHE_HOME": str(self.dir / "helm" / "cache"),
            "HELM_CONFIG_HOME": str(self.dir / "helm" / "config"),
            "HELM_DATA_HOME": str(self.dir / "helm" / "data"),
        }

    @property
    def ca_file(self) -> Path:
        return self.dir / "pki" / "ca.crt"

    @property
    def pki(self) -> _Pki:
        assert self._pki is not None, "the cluster is not started"
        return self._pki

    def component_kubeconfig(self, name: str, subject: str) -> Path:
        """A kubeconfig with a fresh client certificate for `subject` (e.g. /CN=system:kube-scheduler)."""
        crt, key = self.pki.issue(name, subject)
        return write_kubeconfig(
            self.dir / f"{name}.kubeconfig",
            self.server,
            self.pki.ca_crt,
            {"client-certificate-data": _b64(crt), "client-key-data": _b64(key)},
        )

    # ---- lifecycle -------------------------------------------------------------------------------
    def start(self, timeout: float = 180.0) -> Cluster:
        try:
            self.binaries.require()
            self._pki = _Pki(self.dir / "pki")
            self._start_etcd(timeout)
            self._start_apiserver(timeout)
            self._start_controller_manager(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stops every process group (TERM, then KILL) and removes the temporary directory."""
        if self._stopped:
            return
        self._stopped = True
        for name in reversed(list(self._procs)):
            self._terminate(self._procs[name])
        if self.keep:
            print(f"kvmesh control plane files kept in {self.dir}")
        else:
            shutil.rmtree(self.dir, ignore_errors=True)
        with contextlib.suppress(Exception):
            atexit.unregister(self.stop)

    @staticmethod
    def _terminate(proc: subprocess.Popen[bytes], grace: float = 10.0) -> None:
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(wait)
                return

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _spawn(self, name: str, args: Sequence[Any]) -> subprocess.Popen[bytes]:
        with open(self.log_dir / f"{name}.log", "wb") as log:  # the child keeps its own copy
            proc = subprocess.Popen(
                [str(a) for a in args],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.dir,
                start_new_session=True,  # its own process group, killed as a whole by stop()
                preexec_fn=_die_with_parent,
            )
        self._procs[name] = proc
        return proc

    def log_tail(self, name: str, lines: int = 40) -> str:
        path = self.log_dir / f"{name}.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def _check_alive(self, name: str) -> None:
        proc = self._procs[name]
        if proc.poll() is not None:
            raise ClusterError(f"{name} exited with {proc.returncode}:\n{self.log_tail(name)}")

    def _wait_ready(self, name: str, probe: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self._check_alive(name)
            if probe():
                return
            if time.monotonic() > deadline:
                raise ClusterError(f"{name} not ready after {timeout:.0f}s:\n{self.log_tail(name)}")
            time.sleep(0.25)

    def _start_etcd(self, timeout: float) -> None:
        client, peer = free_port(), free_port()
        self.etcd_url = f"http://127.0.0.1:{client}"
        self._spawn(
            "etcd",
            [
                self.binaries.etcd,
                "--name=kvmesh",
                f"--data-dir={self.dir / 'etcd'}",
                f"--listen-client-urls={self.etcd_url}",
                f"--advertise-client-urls={self.etcd_url}",
                f"--listen-peer-urls=http://127.0.0.1:{peer}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{peer}",
                f"--initial-cluster=kvmesh=http://127.0.0.1:{peer}",
                "--unsafe-no-fsync",  # throwaway data: don't let other tests' disk load stall the API
                "--log-level=warn",
            ],
        )

        def healthy() -> bool:
            try:
                with urllib.request.urlopen(f"{self.etcd_url}/health", timeout=2) as r:
                    return json.load(r).get("health") == "true"
            except (OSError, ValueError):
                return False

        self._wait_ready("etcd", healthy, timeout)

    def _admin_ssl_context(self) -> ssl.SSLContext:
        assert self._pki is not None
        ctx = ssl.create_default_context(cafile=str(self._pki.ca_crt))
        ctx.load_cert_chain(str(self.dir / "pki" / "admin.crt"), str(self.dir / "pki" / "admin.key"))
        return ctx

    def _start_apiserver(self, timeout: float) -> None:
        pki = self._pki
        assert pki is not None
        serving = pki.issue(
            "apiserver",
            "/CN=kube-apiserver",
            server_names=[
                "127.0.0.1",
                self.host,
                "localhost",
                "10.0.0.1",
                "kubernetes",
                "kubernetes.default",
                "kubernetes.default.svc",
                "kubernetes.default.svc.cluster.local",
            ],
        )
        admin_crt, admin_key = pki.issue("admin", "/O=system:masters/CN=kvmesh-admin")
        proxy_crt, proxy_key = pki.issue("front-proxy-client", "/CN=front-proxy-client")
        # What the API server shows to kubelets (logs, exec, port-forward): an admin client certificate.
        kubelet_crt, kubelet_key = pki.issue(
            "apiserver-kubelet-client", "/O=system:masters/CN=kube-apiserver"
        )
        # The `kubernetes` Service's endpoints: none on loopback (the lease reconciler refuses a loopback
        # address, and no pod could use it); the real reconciler when pods reach the API at self.host.
        reconciler = "none" if self.host.startswith("127.") else "lease"
        write_kubeconfig(
            self.kubeconfig,
            self.server,
            pki.ca_crt,
            {"client-certificate-data": _b64(admin_crt), "client-key-data": _b64(admin_key)},
        )
        self._spawn(
            "kube-apiserver",
            [
                self.binaries.kube_apiserver,
                f"--etcd-servers={self.etcd_url}",
                f"--bind-address={self.host}",
                f"--advertise-address={self.host}",
                f"--endpoint-reconciler-type={reconciler}",
                f"--kubelet-client-certificate={kubelet_crt}",
                f"--kubelet-client-key={kubelet_key}",
                "--kubelet-preferred-address-types=InternalIP",
                f"--secure-port={self.port}",
                f"--cert-dir={self.dir / 'apiserver-certs'}",
                f"--tls-cert-file={serving[0]}",
                f"--tls-private-key-file={serving[1]}",
                f"--client-ca-file={pki.ca_crt}",
                "--authorization-mode=Node,RBAC",
                "--anonymous-auth=false",
                f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
                f"--service-account-key-file={pki.sa_pub}",
                f"--service-account-signing-key-file={pki.sa_key}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--allow-privileged=true",
                # The aggregation layer's front proxy, as kubeadm sets it up: aggregated APIs work and
                # the controller-manager finds the request-header CA it looks for.
                f"--requestheader-client-ca-file={pki.ca_crt}",
                "--requestheader-allowed-names=front-proxy-client",
                "--requestheader-username-headers=X-Remote-User",
                "--requestheader-group-headers=X-Remote-Group",
                "--requestheader-extra-headers-prefix=X-Remote-Extra-",
                f"--proxy-client-cert-file={proxy_crt}",
                f"--proxy-client-key-file={proxy_key}",
                "--profiling=false",
                "--v=1",
            ],
        )
        ctx = self._admin_ssl_context()

        def ready() -> bool:
            try:
                with urllib.request.urlopen(f"{self.server}/readyz", timeout=5, context=ctx) as r:
                    return r.status == 200
            except (OSError, urllib.error.URLError):
                return False

        self._wait_ready("kube-apiserver", ready, timeout)

    def _start_controller_manager(self, timeout: float) -> None:
        pki = self.pki
        kubeconfig = self.component_kubeconfig("controller-manager", "/CN=system:kube-controller-manager")
        port = free_port()
        self._spawn(
            "kube-controller-manager",
            [
                self.binaries.kube_controller_manager,
                f"--kubeconfig={kubeconfig}",
                f"--authentication-kubeconfig={kubeconfig}",
                f"--authorization-kubeconfig={kubeconfig}",
                "--bind-address=127.0.0.1",
                f"--secure-port={port}",
                f"--cert-dir={self.dir / 'controller-manager-certs'}",
                "--leader-elect=false",
                "--use-service-account-credentials=true",
                f"--service-account-private-key-file={pki.sa_key}",
                f"--root-ca-file={pki.ca_crt}",
                f"--cluster-signing-cert-file={pki.ca_crt}",
                f"--cluster-signing-key-file={pki.ca_key}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--v=1",
            ],
        )
        # Ready once its service-account controller has filled the default namespace: by then the
        # informers are synced and Deployment, ReplicaSet and garbage-collector controllers are running.
        self._wait_ready(
            "kube-controller-manager",
            lambda: (
                self.kubectl("get", "serviceaccount", "default", "-n", "default", check=False).returncode == 0
            ),
            timeout,
        )

    # ---- clients ---------------------------------------------------------------------------------
    def _run(
        self, cmd: Sequence[Any], *, input: str | None, check: bool, timeout: float
    ) -> subprocess.CompletedProcess[str]:
        cmd = [str(c) for c in cmd]
        done = subprocess.run(
            cmd, input=input, capture_output=True, text=True, env=self.env, timeout=timeout, cwd=self.dir
        )
        if check and done.returncode != 0:
            raise subprocess.CalledProcessError(done.returncode, cmd, done.stdout, done.stderr)
        return done

    def kubectl(
        self, *args: Any, input: str | None = None, check: bool = True, timeout: float = 60.0
    ) -> subprocess.CompletedProcess[str]:
        """Runs kubectl as the cluster admin; stdout/stderr are captured as text."""
        return self._run(
            [self.kubectl_path, f"--kubeconfig={self.kubeconfig}", *args],
            input=input,
            check=check,
            timeout=timeout,
        )

    def kubectl_json(self, *args: Any) -> Any:
        """`kubectl <args> -o json`, parsed."""
        return json.loads(self.kubectl(*args, "-o", "json").stdout)

    def apply(self, manifest: str | dict[str, Any] | list[dict[str, Any]]) -> str:
        """`kubectl apply -f -` with a YAML/JSON string, an object or a list of objects."""
        if not isinstance(manifest, str):
            items = manifest if isinstance(manifest, list) else [manifest]
            manifest = json.dumps({"apiVersion": "v1", "kind": "List", "items": items})
        return self.kubectl("apply", "-f", "-", input=manifest).stdout

    def helm(
        self, *args: Any, input: str | None = None, check: bool = True, timeout: float = 300.0
    ) -> subprocess.CompletedProcess[str]:
        """Runs helm against this cluster as the cluster admin."""
        return self._run(
            [self.helm_path, f"--kubeconfig={self.kubeconfig}", *args],
            input=input,
            check=check,
            timeout=timeout,
        )

    def sa_kubeconfig(self, namespace: str, service_account: str, *, duration: str = "24h") -> Path:
        """A kubeconfig that authenticates as the ServiceAccount (token from the TokenRequest API).

        The ServiceAccount must exist; this does not create it, so a missing one is an error.
        """
        token = self.kubectl(
            "create", "token", service_account, "-n", namespace, f"--duration={duration}"
        ).stdout.strip()
        path = self.dir / f"sa-{namespace}-{service_account}.kubeconfig"
        return write_kubeconfig(path, self.server, self.ca_file, {"token": token}, name=service_account)

    def wait_for(
        self,
        predicate: Callable[[], T],
        timeout: float = 30.0,
        *,
        interval: float = 0.25,
        what: str | None = None,
    ) -> T:
        """Calls predicate until it returns something truthy, and returns that; TimeoutError after timeout.

        Exceptions from predicate propagate (use check=False in kubectl calls that may fail meanwhile).
        """
        deadline = time.monotonic() + timeout
        while True:
            result = predicate()
            if result:
                return result
            if time.monotonic() > deadline:
                name = what or getattr(predicate, "__name__", "condition")
                raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {name}")
            time.sleep(interval)
