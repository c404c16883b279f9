"""Converging one InferenceDeployment: apply its children, observe their state, autoscale.

Level-based: every call starts from the object as it is now and the children as they are now, so the
operator survives restarts and repairs drift by simply running again.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kvmesh.operator import builders, status
from kvmesh.operator.autoscaler import Decision, LoadSource, SampleWindow, decide
from kvmesh.operator.kube import Kube, KubeError
from kvmesh.operator.routing import RoutingPublisher, roll_gateways
from kvmesh.operator.spec import DeploymentSpec

log = logging.getLogger("kvmesh.operator")

Manifest = dict[str, Any]


@dataclass(slots=True)
class Outcome:
    """What one pass did, for the handler to turn into a status patch and events."""

    status: Manifest
    changed: list[str] = field(default_factory=list)  # "Kind/name" of children the apply modified
    error: str | None = None
    decision: Decision | None = None


@dataclass
class Reconciler:
    kube: Kube
    config: builders.OperatorConfig
    load_source: LoadSource | None = None
    # Builds a LoadSource for an InferenceDeployment's own spec.redis.url (None: always the default).
    source_factory: Callable[[str], LoadSource] | None = None
    # Publishes spec.routing where the deployment's gateways read it (None: not published).
    routing: RoutingPublisher | None = None
    _sources: dict[str, LoadSource] = field(default_factory=dict)
    _errors: dict[tuple[str, str], str] = field(default_factory=dict)
    _versions: dict[tuple[str, str, str], str] = field(default_factory=dict)
    _windows: dict[tuple[str, str], SampleWindow] = field(default_factory=dict)
    # The InferenceDeployments this process watches, as last seen (fed by their watch events).
    objects: dict[tuple[str, str], Manifest] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def apply_children(self, owner: builders.Owner, spec: DeploymentSpec) -> list[str]:
        """Server-side apply every child; the ones whose resourceVersion moved are returned."""
        changed = []
        for manifest in builders.build_children(owner, spec, self.config):
            result = self.kube.apply(manifest)
            key = (owner.namespace, manifest["kind"], manifest["metadata"]["name"])
            # generation moves only on spec changes (not on the status the controllers write);
            # kinds without one (ConfigMap, Service) only change when someone writes them.
            meta = result["metadata"]
            version = str(meta.get("generation") or meta["resourceVersion"])
            with self._lock:
                if self._versions.get(key) != version:
                    changed.append(f"{manifest['kind']}/{manifest['metadata']['name']}")
                self._versions[key] = version
        return changed

    def observe(
        self, body: Any, spec: DeploymentSpec | None, error: str | None, deployment: Manifest | None = None
    ) -> Manifest:
        """Status from the worker Deployment (given by its watch event, else read once)."""
        owner = builders.Owner.from_body(body)
        if error is None and deployment is None:
            deployment = self.kube.get(
                "apps/v1", "Deployment", owner.namespace, builders.worker_name(owner.name)
            )
        return status.compute_status(
            generation=body["metadata"].get("generation", 0),
            desired=spec.replicas if spec else int(body["spec"].get("replicas", 1)),
            selector=builders.selector_string(owner.name),
            endpoint=builders.endpoint(owner, self.config),
            deployment=deployment,
            previous=dict(body.get("status") or {}),
            apply_error=error,
        )

    def converge(self, body: Any) -> Outcome:
        """Apply the children for the object's current spec, then observe them."""
        owner = builders.Owner.from_body(body)
        spec: DeploymentSpec | None = None
        try:
            spec = DeploymentSpec.parse(body["spec"])
            changed = self.apply_children(owner, spec)
        except (KubeError, ValueError) as exc:
            return Outcome(self.observe(body, spec, str(exc)), error=str(exc))
        changed += self.deliver_routing(owner, spec)
        return Outcome(self.observe(body, spec, None), changed=changed)

    def deliver_routing(self, owner: builders.Owner, spec: DeploymentSpec) -> list[str]:
        """Publish spec.routing in Redis, then roll the gateways that read an older one. Failures
        are logged and retried on the next pass; they never fail the workers' reconcile."""
        if self.routing is None or spec.redis.url not in (None, self.routing.url):
            return []
        if not self.routing.publish(owner.deployment_id, spec.routing):
            return []
        try:
            return roll_gateways(self.kube, owner.namespace, owner.name, spec.routing)
        except KubeError as exc:
            log.warning("Rolling the gateways failed", extra={"deployment": owner.name, "error": str(exc)})
            return []

    def child_event(self, owner_body: Any, child: Manifest, deleted: bool) -> Outcome | None:
        """A watched child changed. Deleted or edited by someone else (its generation, or for kinds
        without one its resourceVersion, differs from what our last apply left): converge again.
        The worker Deployment's own progress: refresh the status from the event, no API read."""
        meta = child["metadata"]
        key = (meta["namespace"], child["kind"], meta["name"])
        version = str(meta.get("generation") or meta.get("resourceVersion"))
        with self._lock:
            applied = self._versions.get(key)
        if deleted or (applied is not None and applied != version):
            return self.converge(owner_body)
        if child["kind"] != "Deployment":
            return None
        try:
            spec = DeploymentSpec.parse(owner_body["spec"])
        except ValueError as exc:
            return Outcome(self.observe(owner_body, None, str(exc)), error=str(exc))
        return Outcome(self.observe(owner_body, spec, None, deployment=child))

    def autoscale(self, body: Any, now: float | None = None) -> Decision | None:
        """One autoscaler step: read load, decide, and write spec.replicas through /scale when it moves."""
        owner = builders.Owner.from_body(body)
        spec = DeploymentSpec.parse(body["spec"])
        key = (owner.namespace, owner.name)
        if not spec.autoscaling_enabled or self.load_source is None:
            self._windows.pop(key, None)
            return None
        now = time.time() if now is None else now
        policy = spec.autoscaling
        window = self._windows.setdefault(key, SampleWindow())
        window.add(self._source(spec).read(owner.deployment_id, now), policy, now)
        current = spec.replicas
        decision = decide(current, list(window.samples), policy, now)
        if decision.desired != current:
            self.kube.scale(owner.namespace, owner.name, decision.desired)
            # Converge the Deployment right away rather than on the next pass.
            self.apply_children(owner, dataclasses.replace(spec, replicas=decision.desired))
        return decision

    def _source(self, spec: DeploymentSpec) -> LoadSource:
        assert self.load_source is not None
        url = spec.redis.url
        if not url or self.source_factory is None:
            return self.load_source
        with self._lock:
            if url not in self._sources:
                self._sources[url] = self.source_factory(url)
            return self._sources[url]

    def is_new_error(self, namespace: str, name: str, error: str | None) -> bool:
        """Whether ``error`` differs from the last one seen for the object (post an event only then)."""
        key = (namespace, name)
        with self._lock:
            previous = self._errors.pop(key, None)
            if error is not None:
                self._errors[key] = error
        return error is not None and error != previous

    def tracked(self) -> int:
        """How many InferenceDeployments this process has applied children for (health detail)."""
        with self._lock:
            return len({(ns, name) for ns, kind, name in self._versions if kind == "Deployment"})

    def forget(self, namespace: str, name: str) -> None:
        """The object is gone: drop what this process holds about it, and its routing settings."""
        if self.objects.pop((namespace, name), None) is not None and self.routing is not None:
            self.routing.withdraw(f"{namespace}/{name}")
        self._windows.pop((namespace, name), None)
        self._errors.pop((namespace, name), None)
        with self._lock:
            worker = builders.worker_name(name)
            for key in [k for k in self._versions if k[0] == namespace and k[2] == worker]:
                self._versions.pop(key, None)


def autoscaling_status(decision: Decision | None, previous: Manifest | None) -> Manifest | None:
    """``status.autoscaling`` after a decision (None removes it when autoscaling is off)."""
    if decision is None:
        return None
    out: Manifest = {
        "desiredReplicas": decision.desired,
        "liveWorkers": decision.workers,
        "reason": decision.reason,
    }
    if decision.metric is not None:
        out["currentMetric"] = round(decision.metric, 4)
    last = (previous or {}).get("lastScaleTime")
    if decision.scaled:
        last = status.now_rfc3339()
    if last:
        out["lastScaleTime"] = last
    return out
