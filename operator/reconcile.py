"""Converging one InferenceDeployment: apply its children, observe their state, autoscale.

Level-based: every call starts from the object as it is now and the children as they are now, so the
operator survives restarts and repairs drift by simply running again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kvmesh.operator import builders, crd, status
from kvmesh.operator.autoscaler import AutoscalingPolicy, Decision, LoadSource, SampleWindow, decide
from kvmesh.operator.kube import Kube, KubeError

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
    _sources: dict[str, LoadSource] = field(default_factory=dict)
    _errors: dict[tuple[str, str], str] = field(default_factory=dict)
    _versions: dict[tuple[str, str, str], str] = field(default_factory=dict)
    _windows: dict[tuple[str, str], SampleWindow] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def apply_children(self, owner: builders.Owner, spec: Manifest) -> list[str]:
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

    def observe(self, body: Any, spec: Manifest, error: str | None) -> Manifest:
        owner = builders.Owner.from_body(body)
        deployment = None
        if error is None:
            deployment = self.kube.get(
                "apps/v1", "Deployment", owner.namespace, builders.worker_name(owner.name)
            )
        return status.compute_status(
            generation=body["metadata"].get("generation", 0),
            desired=int(spec.get("replicas", 1)),
            selector=builders.selector_string(owner.name),
            endpoint=builders.endpoint(owner, self.config),
            deployment=deployment,
            previous=dict(body.get("status") or {}),
            apply_error=error,
        )

    def converge(self, body: Any) -> Outcome:
        """Apply the children for the object's current spec, then observe them."""
        owner = builders.Owner.from_body(body)
        spec = crd.apply_defaults(dict(body["spec"]))
        try:
            changed = self.apply_children(owner, spec)
            return Outcome(self.observe(body, spec, None), changed=changed)
        except (KubeError, ValueError) as exc:
            return Outcome(self.observe(body, spec, str(exc)), error=str(exc))

    def autoscale(self, body: Any, now: float | None = None) -> Decision | None:
        """One autoscaler step: read load, decide, and write spec.replicas through /scale when it moves."""
        owner = builders.Owner.from_body(body)
        spec = crd.apply_defaults(dict(body["spec"]))
        key = (owner.namespace, owner.name)
        if not spec["autoscaling"]["enabled"] or self.load_source is None:
            self._windows.pop(key, None)
            return None
        now = time.time() if now is None else now
        policy = AutoscalingPolicy.from_spec(spec["autoscaling"])
        window = self._windows.setdefault(key, SampleWindow())
        window.add(self._source(spec).read(owner.name, now), policy, now)
        current = int(spec["replicas"])
        decision = decide(current, list(window.samples), policy, now)
        if decision.desired != current:
            self.kube.scale(owner.namespace, owner.name, decision.desired)
            # Converge the Deployment right away rather than on the next pass.
            self.apply_children(owner, {**spec, "replicas": decision.desired})
        return decision

    def _source(self, spec: Manifest) -> LoadSource:
        assert self.load_source is not None
        url = (spec.get("redis") or {}).get("url")
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
        self._windows.pop((namespace, name), None)
        self._errors.pop((namespace, name), None)
        with self._lock:
            names = (builders.worker_name(name), builders.config_name(name))
            for key in [k for k in self._versions if k[0] == namespace and k[2] in names]:
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
