"""Delivers each InferenceDeployment's ``spec.routing`` to the gateways that serve it.

The gateways serving a deployment share one Redis with its workers: the operator writes the routing
settings into the deployment's hash-tagged ``routing`` key (``kvmesh.store.redis_keys``), and a
gateway started without explicit ``--policy``/``--load-factor`` flags routes by them. Gateways read
them at start, so the operator also stamps a hash of the settings on the pod template of every
gateway Deployment labelled ``kvmesh.io/gateway-for=<name>`` in the namespace: a change rolls them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import threading

from kvmesh.operator.kube import Kube
from kvmesh.operator.spec import RoutingSpec
from kvmesh.store.redis_keys import RedisKeys, redis_auth

log = logging.getLogger("kvmesh.operator")


GATEWAY_LABEL = "kvmesh.io/gateway-for"
ROUTING_ANNOTATION = "kvmesh.io/routing-hash"


def routing_fields(routing: RoutingSpec) -> dict[str, str]:
    return {"policy": routing.policy, "load_factor": format(routing.load_factor, "g")}


def routing_hash(routing: RoutingSpec) -> str:
    return hashlib.sha256(json.dumps(routing_fields(routing), sort_keys=True).encode()).hexdigest()[:16]


def roll_gateways(kube: Kube, namespace: str, name: str, routing: RoutingSpec) -> list[str]:
    """Stamps the routing hash on the gateways serving ``name``; returns the ones it changed (and so
    rolled). Gateways already carrying the hash are left alone."""
    wanted = routing_hash(routing)
    query = [("labelSelector", f"{GATEWAY_LABEL}={name}")]
    listed = kube.request("GET", f"/apis/apps/v1/namespaces/{namespace}/deployments", query=query) or {}
    rolled = []
    for gateway in listed.get("items") or []:
        template = gateway["spec"]["template"]["metadata"]
        if (template.get("annotations") or {}).get(ROUTING_ANNOTATION) == wanted:
            continue
        patch = {"spec": {"template": {"metadata": {"annotations": {ROUTING_ANNOTATION: wanted}}}}}
        path = f"/apis/apps/v1/namespaces/{namespace}/deployments/{gateway['metadata']['name']}"
        kube.request("PATCH", path, body=patch, content_type="application/merge-patch+json")
        rolled.append(f"Deployment/{gateway['metadata']['name']}")
    return rolled


class RoutingPublisher:
    """Writes on every pass: the bundled Redis keeps no data across restarts, and the settings come
    back within one resync period after it loses them."""

    def __init__(self, url: str, timeout: float = 2.0) -> None:
        import redis

        self.url = url
        self._redis = redis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout, **redis_auth()
        )
        self._failing: set[str] = set()
        self._lock = threading.Lock()

    def publish(self, deployment: str, routing: RoutingSpec) -> bool:
        """False when Redis failed (logged once per outage); the next pass tries again."""
        import redis

        key = RedisKeys(deployment).routing
        try:
            pipe = self._redis.pipeline(transaction=True)
            pipe.delete(key)
            pipe.hset(key, mapping=routing_fields(routing))
            pipe.execute()
        except redis.RedisError as exc:
            with self._lock:
                first = deployment not in self._failing
                self._failing.add(deployment)
            if first:
                log.warning(
                    "Publishing the routing settings of InferenceDeployment failed",
                    extra={"deployment": deployment, "error": str(exc)},
                )
            return False
        with self._lock:
            self._failing.discard(deployment)
        return True

    def withdraw(self, deployment: str) -> None:
        """Removes a deleted deployment's settings (best effort: a stale key is harmless)."""
        import redis

        with contextlib.suppress(redis.RedisError):
            self._redis.delete(RedisKeys(deployment).routing)
