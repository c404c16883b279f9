"""Redis key names and credentials, shared by the store, the workers' reporters and the operator.

A deployment is named ``<namespace>/<name>`` (a bare ``<name>`` is in namespace ``default``), so
two deployments named alike in different Kubernetes namespaces never share a pool. Keys (all
hash-tagged with that identity, so one deployment lives in one Redis Cluster slot):

- ``kvmesh:{<ns>/<dep>}:workers``              set of worker ids
- ``kvmesh:{<ns>/<dep>}:worker:<id>``          hash: worker_id, address, model, block_size, running,
                                               waiting, kv_usage, num_blocks, heartbeat (unix s); TTL
- ``kvmesh:{<ns>/<dep>}:worker:<id>:blocks``   set of the worker's precise block hashes (hex)
- ``kvmesh:{<ns>/<dep>}:block:<hash hex>``     hash: worker id -> ``p`` (precise) or expiry in ms
                                               (approximate, Redis server clock)
- ``kvmesh:{<ns>/<dep>}:routing``              hash: policy, load_factor (the InferenceDeployment's
                                               spec.routing, written by the operator)

The password comes from the environment (``KVMESH_REDIS_PASSWORD``, or a file named by
``KVMESH_REDIS_PASSWORD_FILE``), never from a URL on a command line.
"""

from __future__ import annotations

import os
from pathlib import Path


def hex64(h: int) -> str:
    return f"{h:016x}"


DEFAULT_NAMESPACE = "default"
PASSWORD_ENV = "KVMESH_REDIS_PASSWORD"
PASSWORD_FILE_ENV = "KVMESH_REDIS_PASSWORD_FILE"


def deployment_id(deployment: str) -> str:
    """``<namespace>/<name>``; a bare name is in namespace ``default`` (as kubectl reads it)."""
    namespace, _, name = deployment.rpartition("/")
    if not name or any(c in deployment for c in "{},"):
        raise ValueError(f"deployment {deployment!r} is not <name> or <namespace>/<name>")
    return f"{namespace or DEFAULT_NAMESPACE}/{name}"


def redis_auth() -> dict[str, str]:
    """Client keyword arguments for the password in the environment (empty when there is none).

    A password inside the URL still wins (redis-py lets URL parts override keywords)."""
    password = os.environ.get(PASSWORD_ENV, "")
    file = os.environ.get(PASSWORD_FILE_ENV, "")
    if not password and file:
        password = Path(file).read_text().rstrip("\r\n")
    return {"password": password} if password else {}


class RedisKeys:
    def __init__(self, deployment: str) -> None:
        self.deployment = deployment_id(deployment)
        self.prefix = f"kvmesh:{{{self.deployment}}}:"
        self.routing = self.prefix + "routing"
        self.workers = self.prefix + "workers"
        self.worker_prefix = self.prefix + "worker:"
        self.block_prefix = self.prefix + "block:"

    def worker(self, worker_id: str) -> str:
        return self.worker_prefix + worker_id

    def worker_blocks(self, worker_id: str) -> str:
        return self.worker_prefix + worker_id + ":blocks"

    def block(self, h: int) -> str:
        return self.block_prefix + hex64(h)
