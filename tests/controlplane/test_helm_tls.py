"""The chart's certificates and keys from Secrets: TLS (cert-manager's kubernetes.io/tls shape) on the
gateway and, through the operator, on every worker pod; the gateway's API keys file; the CA of a
rediss:// Redis, bundled (served over TLS by the chart's own start command, run here with a real
redis-server) or external. The rendered manifests go through the real API server's validation, and a
real operator started with the rendered flags builds worker pods that mount the same Secrets."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from .test_helm import CHART, RELEASE, named
from .test_operator import SAMPLES, OperatorProcess, install_crd

pytestmark = pytest.mark.controlplane

NAMESPACE = "kvmesh-tls"
CERTS = "/etc/kvmesh/tls"
REDIS_CA_URL_PARAM = "ssl_ca_certs=/etc/kvmesh/redis-ca/ca.crt"
TLS = ("--set", "tls.enabled=true", "--set", "tls.secretName=kvmesh-tls")
MTLS = (*TLS, "--set", "tls.clientAuth=true")
API_KEYS = ("--set", "gateway.apiKeys.secretName=kvmesh-api-keys")
REDIS_TLS = ("--set", "redis.tls.enabled=true", "--set", "redis.tls.secretName=kvmesh-redis-tls")


def rendered(kube: Any, *args: str) -> list[dict]:
    out = kube.helm("template", RELEASE, str(CHART), "--namespace", NAMESPACE, *args).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def pod_spec(docs: list[dict], component: str) -> dict:
    return named(docs, "Deployment", f"kvmesh-{component}")["spec"]["template"]["spec"]


def secret_at(pod: dict, path: str) -> dict:
    """The Secret volume the pod's first container mounts, read-only, at ``path``."""
    mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["mountPath"] == path)
    assert mount.get("readOnly") is True, mount
    return next(v for v in pod["volumes"] if v["name"] == mount["name"])["secret"]


def parsed(configure: Any, argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    configure(parser)
    return parser.parse_args(argv)


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def test_gateway_mounts_its_certificate_and_api_keys_and_passes_the_flags(kube: Any) -> None:
    from kvmesh.gateway import cli as gateway_cli

    gateway = pod_spec(rendered(kube, *MTLS, *API_KEYS), "gateway")
    container = gateway["containers"][0]
    args = parsed(gateway_cli.configure, container["args"])
    assert (args.tls_cert, args.tls_key) == (f"{CERTS}/tls.crt", f"{CERTS}/tls.key")
    assert args.tls_client_ca == f"{CERTS}/ca.crt"  # mutual TLS for clients
    # To the workers: verified against ca.crt under the name the shared certificate carries, and
    # presenting the gateway's own certificate.
    assert args.worker_tls_ca == f"{CERTS}/ca.crt"
    assert args.worker_tls_server_name == f"kvmesh-gateway.{NAMESPACE}.svc"
    assert (args.worker_tls_cert, args.worker_tls_key) == (f"{CERTS}/tls.crt", f"{CERTS}/tls.key")
    assert secret_at(gateway, CERTS) == {"secretName": "kvmesh-tls", "defaultMode": 0o440}
    assert args.api_keys_file == "/etc/kvmesh/api-keys/api-keys.json"
    assert secret_at(gateway, "/etc/kvmesh/api-keys") == {
        "secretName": "kvmesh-api-keys",
        "defaultMode": 0o440,
        "items": [{"key": "api-keys.json", "path": "api-keys.json"}],
    }
    # gRPC probes are plaintext only: over TLS the kubelet asks /health over HTTPS.
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": "http", "scheme": "HTTPS"}

    # TLS without client authentication, a separate worker certificate and name, a custom key.
    gateway = pod_spec(
        rendered(
            kube, *TLS, "--set", "tls.workerSecretName=workers-tls",
            "--set", "tls.workerServerName=workers.example", "--set", "gateway.apiKeys.secretName=k",
            "--set", "gateway.apiKeys.secretKey=keys.json",
        ),
        "gateway",
    )  # fmt: skip
    args = parsed(gateway_cli.configure, gateway["containers"][0]["args"])
    assert (args.tls_client_ca, args.worker_tls_cert, args.worker_tls_key) == ("", "", "")
    assert args.worker_tls_server_name == "workers.example"
    assert args.api_keys_file == "/etc/kvmesh/api-keys/keys.json"
    # Off by default: plaintext, gRPC probes, no Secret volumes.
    gateway = pod_spec(rendered(kube), "gateway")
    args = parsed(gateway_cli.configure, gateway["containers"][0]["args"])
    assert (args.tls_cert, args.worker_tls_ca, args.api_keys_file) == ("", "", "")
    assert not [v for v in gateway["volumes"] if "secret" in v]
    assert gateway["containers"][0]["readinessProbe"]["grpc"] == {"port": 50051}


def test_redis_ca_reaches_every_client_and_the_url_names_it(kube: Any) -> None:
    for values, url in (
        (REDIS_TLS, f"rediss://kvmesh-redis.{NAMESPACE}.svc:6379/0?{REDIS_CA_URL_PARAM}"),
        (
            (
                "--set", "redis.enabled=false", "--set", "redis.auth.existingSecret=ops-redis",
                "--set", "redis.external.url=rediss://redis.example:6380/0?ssl_cert_reqs=required",
                "--set", "redis.tls.secretName=kvmesh-redis-tls",
            ),
            f"rediss://redis.example:6380/0?ssl_cert_reqs=required&{REDIS_CA_URL_PARAM}",
        ),
    ):  # fmt: skip
        docs = rendered(kube, *values)
        for component in ("gateway", "operator"):
            pod = pod_spec(docs, component)
            assert env_of(pod["containers"][0])["KVMESH_REDIS_URL"]["value"] == url, component
            assert secret_at(pod, "/etc/kvmesh/redis-ca") == {
                "secretName": "kvmesh-redis-tls",
                "defaultMode": 0o440,
                "items": [{"key": "ca.crt", "path": "ca.crt"}],  # the CA only, never the key
            }
        assert "--redis-ca-secret=kvmesh-redis-tls" in pod_spec(docs, "operator")["containers"][0]["args"]


def test_bad_certificate_values_are_refused(kube: Any) -> None:
    for values, message in (
        (("--set", "tls.enabled=true"), "/tls/secretName"),
        (("--set", "redis.tls.enabled=true"), "/redis/tls/secretName"),
        (
            (
                "--set", "redis.enabled=false", "--set", "redis.external.url=redis://r:6379/0",
                "--set", "redis.auth.existingSecret=s", "--set", "redis.tls.secretName=ca",
            ),
            "redis.external.url must be rediss://",
        ),
        (
            (
                "--set", "redis.enabled=false", "--set", "redis.external.url=rediss://r:6379/0",
                "--set", "redis.auth.existingSecret=s", *REDIS_TLS,
            ),
            "for an external Redis give a rediss:// redis.external.url",
        ),
    ):  # fmt: skip
        done = kube.helm("template", RELEASE, str(CHART), *values, check=False)
        assert done.returncode != 0 and message in done.stderr, (values, done.stderr[-500:])


def issue_certificates(tmp: Path, server_names: str) -> dict[str, Path]:
    """An openssl CA and a server certificate it signed, as a kubernetes.io/tls Secret holds them."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1"]

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=tmp, check=True, capture_output=True)

    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-subj", "/CN=kvmesh-test-ca")
    (tmp / "server.ext").write_text(f"subjectAltName={server_names}\nextendedKeyUsage=serverAuth\n")
    openssl("req", *ec[:-2], "-keyout", "tls.key", "-out", "tls.csr", "-subj", "/CN=kvmesh-redis")
    openssl("x509", "-req", "-in", "tls.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "tls.crt", "-days", "1", "-extfile", "server.ext")  # fmt: skip
    return {name: tmp / name for name in ("ca.crt", "tls.crt", "tls.key")}


def test_bundled_redis_serves_only_tls_with_the_secret_certificate(kube: Any, tmp_path: Path) -> None:
    """The chart's own Redis command (password and TLS) with a real redis-server: clients that verify
    it with ca.crt get in, plaintext gets nothing, and the rendered readiness probe answers PONG."""
    import redis

    from .cluster import free_port

    certs = issue_certificates(tmp_path, f"DNS:kvmesh-redis.{NAMESPACE}.svc")
    password = "tls-redis-pw"
    docs = rendered(kube, *REDIS_TLS, "--set-string", f"redis.auth.password={password}")
    container = pod_spec(docs, "redis")["containers"][0]
    port = free_port()
    script = (
        container["args"][0].replace("/run/redis", str(tmp_path)).replace("/etc/redis/tls", str(tmp_path))
    )
    script = script.replace("--tls-port 6379", f"--tls-port {port}") + " --bind 127.0.0.1"
    script = script.replace("exec redis-server", f"exec {shutil.which('redis-server')}")
    env = {**os.environ, "REDIS_PASSWORD": password, "REDISCLI_AUTH": password}
    proc = subprocess.Popen(["sh", "-c", script], env=env, cwd=tmp_path)
    url = env_of(pod_spec(docs, "gateway")["containers"][0])["KVMESH_REDIS_URL"]["value"]
    assert url.startswith("rediss://") and REDIS_CA_URL_PARAM in url
    try:
        # Verified against ca.crt; the name checked in the cluster (the Service's) is not loopback's.
        client = redis.Redis(
            port=port, password=password, socket_timeout=2,
            ssl=True, ssl_ca_certs=str(certs["ca.crt"]), ssl_check_hostname=False,
        )  # fmt: skip
        with pytest.raises(redis.ConnectionError):  # a client trusting another CA is refused
            redis.Redis(port=port, password=password, ssl=True, ssl_check_hostname=False).ping()
        deadline = time.monotonic() + 20
        while True:
            try:
                assert client.ping()
                break
            except redis.ConnectionError:
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.1)
        with pytest.raises(redis.ConnectionError):  # plaintext: the port speaks TLS only
            redis.Redis(port=port, password=password, socket_timeout=2).ping()
        # The probe as the pod runs it (on loopback, which the certificate does not name), on this port.
        probe = [
            a.replace("/etc/redis/tls", str(tmp_path)) for a in container["readinessProbe"]["exec"]["command"]
        ]
        probe = [probe[0], "-p", str(port), *probe[1:]]
        done = subprocess.run(probe, env=env, capture_output=True, text=True, timeout=10)
        assert done.stdout.strip() == "PONG", done
    finally:
        proc.terminate()
        proc.wait(10)


def test_rendered_release_validates_and_the_operator_gives_workers_the_certificates(
    kube: Any, tmp_path: Path
) -> None:
    """The rendered manifests pass the real API server's validation (dry run), and the operator run
    with the rendered flags and env creates worker pods that mount the workers' TLS Secret and the
    Redis CA, pass the TLS flags and probe over HTTPS."""
    from kvmesh.worker import cli as worker_cli

    install_crd(kube)
    if kube.kubectl("get", "namespace", NAMESPACE, check=False).returncode != 0:
        kube.kubectl("create", "namespace", NAMESPACE)
    docs = rendered(kube, *MTLS, *API_KEYS, *REDIS_TLS, "--set", "crds.install=false")
    checked = kube.kubectl(
        "apply", "--dry-run=server", "-o", "name", "-f", "-", input="\n---\n".join(map(json.dumps, docs))
    )
    assert "deployment.apps/kvmesh-gateway" in checked.stdout

    container = pod_spec(docs, "operator")["containers"][0]
    flags = [a for a in container["args"] if not a.startswith(("--liveness", "--leader-election"))]
    assert {"--worker-tls-secret=kvmesh-tls", "--worker-tls-client-auth"} <= set(flags)
    redis_url = env_of(container)["KVMESH_REDIS_URL"]["value"]
    operator = OperatorProcess(
        kube.kubeconfig, tmp_path / "operator.log", *flags, "--no-autoscaler",
        env={"KVMESH_REDIS_URL": redis_url},
    )  # fmt: skip
    try:
        operator.wait_healthy()
        kube.kubectl("apply", "-n", NAMESPACE, "-f", str(SAMPLES / "smollm2-cpu.yaml"))

        def worker_deployment() -> dict | None:
            done = kube.kubectl(
                "get", "deployment", "smollm2-worker", "-n", NAMESPACE, "-o", "json", check=False
            )
            return json.loads(done.stdout) if done.returncode == 0 else None

        pod = kube.wait_for(worker_deployment, timeout=60, what="the worker Deployment")["spec"]["template"]
        pod = pod["spec"]
        worker = pod["containers"][0]
        args = parsed(worker_cli.configure, worker["command"][2:])
        assert (args.tls_cert, args.tls_key) == (f"{CERTS}/tls.crt", f"{CERTS}/tls.key")
        assert args.tls_client_ca == f"{CERTS}/ca.crt"
        assert secret_at(pod, CERTS) == {"secretName": "kvmesh-tls", "defaultMode": 0o440}
        assert env_of(worker)["KVMESH_REDIS_URL"]["value"] == redis_url
        assert secret_at(pod, "/etc/kvmesh/redis-ca")["secretName"] == "kvmesh-redis-tls"
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            assert worker[probe]["httpGet"]["scheme"] == "HTTPS", probe
        assert "Traceback" not in operator.log()
    finally:
        kube.kubectl("delete", "-n", NAMESPACE, "-f", str(SAMPLES / "smollm2-cpu.yaml"), check=False)
        operator.stop()
        print(operator.log()[-4000:])
