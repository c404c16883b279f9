"""Load-based autoscaling of an InferenceDeployment's replicas.

The decision is a pure function of the current replica count, the load samples seen over time and
the policy (min/max, target, tolerance, stabilization windows), after the Kubernetes HPA's algorithm:

- each sample recommends ``ceil(total load / target)`` replicas, or the current count while the load
  per replica is within ``1 +- tolerance`` of the target;
- scaling up follows the *lowest* recommendation inside the scale-up window, scaling down the
  *highest* inside the scale-down window, so a short spike or dip never moves the count;
- a scale-down also needs samples covering its whole window (a restarted operator waits a window);
- a scale-up at most doubles the replicas (or adds 4) per step; stale or missing load holds the count.

Load is read through :class:`LoadSource`; :class:`RedisLoadSource` reads what workers report to Redis.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

QUEUE_DEPTH = "queueDepth"
KV_USAGE = "kvUsage"


@dataclass(slots=True, frozen=True)
class LoadSnapshot:
    """One deployment's load at one moment, summed over its live workers."""

    time: float
    workers: int
    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0  # mean over the live workers, 0..1

    def per_replica(self, metric: str) -> float:
        if metric == KV_USAGE:
            return self.kv_usage
        return (self.running + self.waiting) / max(self.workers, 1)


class LoadSource(Protocol):
    def read(self, deployment: str, now: float | None = None) -> LoadSnapshot | None:
        """The deployment's current load, or None when it cannot be read."""


@dataclass(slots=True, frozen=True)
class AutoscalingPolicy:
    """``spec.autoscaling`` as the decision reads it; the CRD schema holds the defaults."""

    min_replicas: int
    max_replicas: int
    metric: str
    target: float
    tolerance: float
    scale_up_window: float
    scale_down_window: float
    stale_after: float = 60.0  # a sample older than this is no evidence

    @classmethod
    def from_spec(cls, autoscaling: dict[str, Any]) -> AutoscalingPolicy:
        """From a defaulted ``spec.autoscaling``."""
        return cls(
            min_replicas=int(autoscaling["minReplicas"]),
            max_replicas=int(autoscaling["maxReplicas"]),
            metric=autoscaling["target"]["metric"],
            target=float(autoscaling["target"]["value"]),
            tolerance=float(autoscaling["tolerance"]),
            scale_up_window=float(autoscaling["scaleUp"]["stabilizationWindowSeconds"]),
            scale_down_window=float(autoscaling["scaleDown"]["stabilizationWindowSeconds"]),
        )

    @property
    def history(self) -> float:
        """How far back samples matter."""
        return max(self.scale_up_window, self.scale_down_window, self.stale_after)


@dataclass(slots=True, frozen=True)
class Decision:
    desired: int
    reason: str  # ScaledUp | ScaledDown | Unchanged | NoMetrics
    message: str
    metric: float | None = None
    workers: int = 0

    @property
    def scaled(self) -> bool:
        return self.reason in ("ScaledUp", "ScaledDown")


def recommend(current: int, sample: LoadSnapshot, policy: AutoscalingPolicy) -> int:
    """Replicas one sample asks for, clamped to [min, max]: the total load over the per-replica target.

    Workers that do not report yet (starting pods) add no load, so they neither count as idle capacity
    nor as demand; the current count stands while load per current replica is within tolerance."""
    total = sample.per_replica(policy.metric) * sample.workers
    if current > 0 and abs(total / (policy.target * current) - 1.0) <= policy.tolerance:
        return _clamp(current, policy)
    return _clamp(math.ceil(total / policy.target - 1e-9), policy)


def _clamp(replicas: int, policy: AutoscalingPolicy) -> int:
    return max(policy.min_replicas, min(policy.max_replicas, replicas))


def decide(current: int, samples: Sequence[LoadSnapshot], policy: AutoscalingPolicy, now: float) -> Decision:
    """Desired replicas given ``current`` and the samples seen so far (oldest first)."""
    live = [s for s in samples if s.workers > 0 and now - s.time <= policy.history]
    latest = live[-1] if live else None
    if latest is None or now - latest.time > policy.stale_after:
        desired = _clamp(current, policy)
        reason = "NoMetrics" if desired == current else ("ScaledUp" if desired > current else "ScaledDown")
        return Decision(
            desired, reason, "No fresh load from the workers; holding the replica count within bounds."
        )
    metric = latest.per_replica(policy.metric)
    recs = [(s.time, recommend(current, s, policy)) for s in live]
    up = min(r for t, r in recs if t >= now - policy.scale_up_window or t == latest.time)
    down_recs = [r for t, r in recs if t >= now - policy.scale_down_window or t == latest.time]
    covered = live[0].time <= now - policy.scale_down_window
    down = max(down_recs) if covered else current
    desired = current
    if up > current:
        desired = min(up, max(2 * current, current + 4))
    elif down < current:
        desired = down
    desired = _clamp(desired, policy)
    detail = (
        f"{policy.metric}={metric:.3g} per replica (target {policy.target:g}) over {latest.workers} workers"
    )
    if desired > current:
        return Decision(
            desired, "ScaledUp", f"Scaled up from {current} to {desired}: {detail}.", metric, latest.workers
        )
    if desired < current:
        return Decision(
            desired,
            "ScaledDown",
            f"Scaled down from {current} to {desired}: {detail}.",
            metric,
            latest.workers,
        )
    return Decision(current, "Unchanged", f"Kept {current} replicas: {detail}.", metric, latest.workers)


@dataclass(slots=True)
class SampleWindow:
    """The samples one deployment's autoscaler keeps between ticks (operator memory)."""

    samples: deque[LoadSnapshot] = field(default_factory=deque)

    def add(self, sample: LoadSnapshot | None, policy: AutoscalingPolicy, now: float) -> None:
        if sample is not None:
            self.samples.append(sample)
        while self.samples and now - self.samples[0].time > policy.history:
            self.samples.popleft()

    def reset(self) -> None:
        self.samples.clear()


class RedisLoadSource:
    """Reads worker load from Redis, as workers/the gateway write it.

    The keys are the metadata store's (``kvmesh.store.redis_keys``, hash-tagged per
    ``<namespace>/<name>``): the set of worker ids, and one hash per worker with ``running``,
    ``waiting``, ``kv_usage`` and ``heartbeat`` (unix seconds), expiring by TTL. Workers whose hash
    is gone or whose heartbeat is older than ``stale_after`` seconds are not counted.
    """

    def __init__(self, url: str, stale_after: float = 30.0, timeout: float = 2.0) -> None:
        import redis

        from kvmesh.store.redis_keys import redis_auth

        self._redis = redis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout, **redis_auth()
        )
        self.stale_after = stale_after

    def read(self, deployment: str, now: float | None = None) -> LoadSnapshot | None:
        """Load of ``deployment`` (``<namespace>/<name>``)."""
        import redis

        from kvmesh.store.redis_keys import RedisKeys

        keys = RedisKeys(deployment)
        now = time.time() if now is None else now
        try:
            ids = sorted(m.decode() for m in self._redis.smembers(keys.workers))
            pipe = self._redis.pipeline(transaction=False)
            for worker_id in ids:
                pipe.hgetall(keys.worker(worker_id))
            hashes = pipe.execute() if ids else []
        except redis.RedisError:
            return None
        return aggregate(hashes, now, self.stale_after)

    def close(self) -> None:
        self._redis.close()


def aggregate(hashes: Sequence[dict[bytes, bytes]], now: float, stale_after: float) -> LoadSnapshot:
    """Sum the fresh workers' load hashes into one snapshot."""
    workers = running = waiting = 0
    kv_total = 0.0
    for fields in hashes:
        values = {k.decode(): v.decode() for k, v in fields.items()}
        try:
            heartbeat = float(values.get("heartbeat", "0"))
            if now - heartbeat > stale_after:
                continue
            running += int(float(values.get("running", "0")))
            waiting += int(float(values.get("waiting", "0")))
            kv_total += float(values.get("kv_usage", "0"))
        except ValueError:
            continue
        workers += 1
    return LoadSnapshot(now, workers, running, waiting, kv_total / workers if workers else 0.0)
