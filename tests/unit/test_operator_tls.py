"""The operator's certificate plumbing for worker pods: the workers' TLS Secret (served on the gRPC and
HTTP ports, mutual TLS with its ca.crt) and the CA of a rediss:// Redis, each a Secret volume whose
paths the worker's flags and the Redis URL name; probes move to HTTPS, which the kubelet can make."""

from __future__ import annotations

import argparse

from kvmesh.operator import builders, main
from kvmesh.operator.builders import OperatorConfig, Owner
from kvmesh.operator.spec import DeploymentSpec
from kvmesh.operator.workerpod import RedisDefaults, WorkerTls

OWNER = Owner(name="smollm2", namespace="serving", uid="uid-1")
CA_URL = "rediss://redis.example:6380/0?ssl_ca_certs=/etc/kvmesh/redis-ca/ca.crt"


def worker_pod(config: OperatorConfig, **spec: object) -> dict:
    parsed = DeploymentSpec.parse({"model": {"source": "hf://HuggingFaceTB/SmolLM2-135M-Instruct"}, **spec})
    return builders.build_worker_deployment(OWNER, parsed, config)["spec"]["template"]["spec"]


def worker_args(container: dict) -> argparse.Namespace:
    from kvmesh.worker import cli as worker_cli

    parser = argparse.ArgumentParser()
    worker_cli.configure(parser)
    assert container["command"][:2] == ["kvmesh", "worker"]
    return parser.parse_args(container["command"][2:])


def mounted(pod: dict, path: str) -> dict:
    """The Secret volume mounted (read-only) at ``path`` in the worker container."""
    mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["mountPath"] == path)
    assert mount["readOnly"] is True
    return next(v for v in pod["volumes"] if v["name"] == mount["name"])["secret"]


def operator_config(*argv: str) -> OperatorConfig:
    parser = argparse.ArgumentParser()
    main.configure(parser)
    return main.operator_config(parser.parse_args(list(argv)))


def test_plaintext_by_default() -> None:
    pod = worker_pod(OperatorConfig())
    args = worker_args(pod["containers"][0])
    assert (args.tls_cert, args.tls_key, args.tls_client_ca) == ("", "", "")
    assert not [v for v in pod["volumes"] if "secret" in v]
    assert pod["containers"][0]["readinessProbe"]["grpc"] == {"port": 50051}


def test_worker_tls_secret_is_mounted_and_served_with_https_probes() -> None:
    config = operator_config("--worker-tls-secret=kvmesh-tls")
    assert config.tls == WorkerTls("kvmesh-tls", client_auth=False)
    pod = worker_pod(config)
    container = pod["containers"][0]
    args = worker_args(container)
    assert (args.tls_cert, args.tls_key) == ("/etc/kvmesh/tls/tls.crt", "/etc/kvmesh/tls/tls.key")
    assert args.tls_client_ca == ""  # TLS only: any client may connect
    assert mounted(pod, "/etc/kvmesh/tls") == {"secretName": "kvmesh-tls", "defaultMode": 0o440}
    # The kubelet dials gRPC probes in plaintext: under TLS the probes ask the HTTP port over HTTPS,
    # /health (loaded) for startup and liveness, /ready (registered) for readiness.
    names = ("startupProbe", "livenessProbe", "readinessProbe")
    probes = {name: container[name]["httpGet"] for name in names}
    assert {p["scheme"] for p in probes.values()} == {"HTTPS"}
    assert {p["port"] for p in probes.values()} == {8000} and args.http_port == 8000
    assert [p["path"] for p in probes.values()] == ["/health", "/health", "/ready"]
    plain = worker_pod(OperatorConfig())["containers"][0]
    assert container["startupProbe"]["failureThreshold"] == plain["startupProbe"]["failureThreshold"]


def test_mutual_tls_checks_clients_with_the_secret_ca() -> None:
    pod = worker_pod(operator_config("--worker-tls-secret=kvmesh-tls", "--worker-tls-client-auth"))
    assert worker_args(pod["containers"][0]).tls_client_ca == "/etc/kvmesh/tls/ca.crt"


def test_client_auth_without_a_secret_is_refused() -> None:
    parser = argparse.ArgumentParser()
    main.configure(parser)
    assert main.run(parser.parse_args(["--worker-tls-client-auth"])) == 2


def test_redis_ca_is_mounted_where_the_default_url_names_it() -> None:
    config = operator_config(f"--redis-url={CA_URL}", "--redis-ca-secret=redis-tls")
    assert config.redis == RedisDefaults(url=CA_URL, ca_secret="redis-tls")
    pod = worker_pod(config)
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    assert env["KVMESH_REDIS_URL"]["value"] == CA_URL
    assert mounted(pod, "/etc/kvmesh/redis-ca") == {
        "secretName": "redis-tls",
        "defaultMode": 0o440,
        "items": [{"key": "ca.crt", "path": "ca.crt"}],  # only the CA, never a key the Secret holds
    }
    # An InferenceDeployment with its own Redis brings its own trust: no operator CA there.
    own = worker_pod(config, redis={"url": "rediss://mine:6380/0"})
    assert not [v for v in own["volumes"] if v["name"] == "redis-ca"]
