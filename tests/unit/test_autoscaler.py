"""The autoscaler's decisions: targets, bounds, stabilization windows, flapping protection."""

from __future__ import annotations

import dataclasses

from kvmesh.operator import crd
from kvmesh.operator.autoscaler import (
    AutoscalingPolicy,
    LoadSnapshot,
    SampleWindow,
    aggregate,
    decide,
    recommend,
)
from kvmesh.store.redis_keys import RedisKeys

# The CRD's defaults are the only ones: tests start from them, as the operator does.
DEFAULTS = AutoscalingPolicy.from_spec(crd.apply_defaults({"model": {"source": "hf://a/b"}})["autoscaling"])


def make_policy(**changes: object) -> AutoscalingPolicy:
    return dataclasses.replace(DEFAULTS, **changes)


POLICY = make_policy(max_replicas=10, scale_up_window=0, scale_down_window=300)


def load(t: float, workers: int, inflight: int, kv: float = 0.0) -> LoadSnapshot:
    return LoadSnapshot(
        time=t, workers=workers, running=inflight // 2, waiting=inflight - inflight // 2, kv_usage=kv
    )


def steady(current: int, inflight: int, start: float, end: float, step: float = 10.0) -> list[LoadSnapshot]:
    out, t = [], start
    while t <= end:
        out.append(load(t, current, inflight))
        t += step
    return out


def test_recommendation_is_total_load_over_target() -> None:
    assert recommend(2, load(0, 2, 48), POLICY) == 6  # 48 in flight / 8 per replica
    assert recommend(2, load(0, 2, 19), POLICY) == 3
    assert recommend(2, load(0, 2, 0), POLICY) == 1  # min


def test_within_tolerance_keeps_the_current_count() -> None:
    assert recommend(4, load(0, 4, 34), POLICY) == 4  # 8.5 per replica: within 10%
    assert recommend(4, load(0, 4, 36), POLICY) == 5  # 9 per replica: beyond


def test_kv_usage_metric() -> None:
    policy = make_policy(metric="kvUsage", target=0.5, min_replicas=1, max_replicas=10)
    assert recommend(2, load(0, 2, 0, kv=0.9), policy) == 4  # 2 x 0.9 / 0.5 = 3.6
    assert recommend(2, load(0, 2, 0, kv=0.5), policy) == 2


def test_bounds_clamp_decisions() -> None:
    policy = make_policy(min_replicas=2, max_replicas=3, target=8, scale_down_window=0)
    assert decide(2, [load(100, 2, 1000)], policy, now=100).desired == 3
    assert decide(3, [load(100, 3, 0)], policy, now=100).desired == 2


def test_scale_up_is_immediate_with_a_zero_window() -> None:
    d = decide(2, [load(100, 2, 48)], POLICY, now=100)
    assert (d.desired, d.reason) == (6, "ScaledUp")
    assert "queueDepth=24" in d.message


def test_scale_up_at_most_doubles_or_adds_four() -> None:
    assert decide(1, [load(100, 1, 800)], POLICY, now=100).desired == 5
    assert decide(5, [load(100, 5, 800)], POLICY, now=100).desired == 10


def test_scale_up_window_ignores_a_short_spike() -> None:
    policy = make_policy(target=8, max_replicas=10, scale_up_window=60, scale_down_window=300)
    samples = [*steady(2, 16, 0, 100), load(110, 2, 80)]  # one spike sample
    assert decide(2, samples, policy, now=110).desired == 2
    sustained = [*steady(2, 16, 0, 40), *steady(2, 80, 50, 120)]  # high for a whole minute
    assert decide(2, sustained, policy, now=120).desired == 6  # wants 10: +4 this step, more next


def test_scale_down_waits_for_its_window() -> None:
    busy = steady(4, 32, 0, 200)
    quiet = steady(4, 4, 210, 400)
    # Load dropped at t=210: within 300 s the busy samples still ask for 4.
    assert decide(4, busy + quiet, POLICY, now=400).desired == 4
    # Once the busy samples leave the window, the highest recommendation left is 1.
    later = busy + steady(4, 4, 210, 520)
    d = decide(4, later, POLICY, now=520)
    assert (d.desired, d.reason) == (1, "ScaledDown")


def test_scale_down_needs_a_full_window_of_evidence() -> None:
    # A freshly (re)started operator has seen 60 s of low load: not enough to scale down.
    assert decide(4, steady(4, 0, 1000, 1060), POLICY, now=1060).desired == 4
    assert decide(4, steady(4, 0, 700, 1060), POLICY, now=1060).desired == 1


def test_oscillating_load_does_not_flap() -> None:
    """Load alternating every 30 s between 'needs 2' and 'needs 4' settles at 4 and stays there."""
    policy = make_policy(target=8, max_replicas=10, scale_up_window=0, scale_down_window=300)
    current, history, counts = 2, [], []
    for step in range(60):
        t = 1000 + step * 30
        inflight = 32 if step % 2 == 0 else 16
        history.append(load(t, current, inflight))
        current = decide(current, history, policy, now=t).desired
        counts.append(current)
    assert counts[0] == 4
    assert set(counts) == {4}, counts


def test_oscillation_against_an_up_window_holds_the_count() -> None:
    policy = make_policy(target=8, max_replicas=10, scale_up_window=120, scale_down_window=300)
    current, history, changes = 2, steady(2, 16, 4800, 4990), 0
    for step in range(40):
        t = 5000 + step * 30
        history.append(load(t, current, 32 if step % 2 == 0 else 16))
        new = decide(current, history, policy, now=t).desired
        changes += new != current
        current = new
    assert changes == 0 and current == 2


def test_stale_or_missing_load_holds_the_count() -> None:
    assert decide(3, [], POLICY, now=100).reason == "NoMetrics"
    assert decide(3, [], POLICY, now=100).desired == 3
    stale = [load(0, 3, 200)]
    assert decide(3, stale, POLICY, now=1000).desired == 3
    # No workers reporting yet (pods loading the model) is no evidence either.
    assert decide(3, [LoadSnapshot(100, 0)], POLICY, now=100).reason == "NoMetrics"


def test_missing_metrics_still_respect_bounds() -> None:
    policy = make_policy(min_replicas=2, max_replicas=4)
    assert decide(1, [], policy, now=0).desired == 2
    assert decide(9, [], policy, now=0).desired == 4


def test_policy_from_defaulted_spec() -> None:
    spec = {
        "enabled": True,
        "minReplicas": 2,
        "maxReplicas": 6,
        "target": {"metric": "kvUsage", "value": 0.7},
        "tolerance": 0.05,
        "scaleUp": {"stabilizationWindowSeconds": 30},
        "scaleDown": {"stabilizationWindowSeconds": 600},
    }
    p = AutoscalingPolicy.from_spec(spec)
    assert (p.min_replicas, p.max_replicas, p.metric, p.target) == (2, 6, "kvUsage", 0.7)
    assert (p.scale_up_window, p.scale_down_window, p.tolerance) == (30, 600, 0.05)


def test_sample_window_keeps_only_what_matters() -> None:
    window = SampleWindow()
    for t in range(0, 1000, 10):
        window.add(load(t, 1, 1), POLICY, now=t)
    assert window.samples[0].time >= 990 - POLICY.history
    window.add(None, POLICY, now=5000)
    assert not window.samples


def test_redis_keys_are_hash_tagged_per_namespaced_deployment() -> None:
    keys = RedisKeys("serving/llama")
    assert keys.workers == "kvmesh:{serving/llama}:workers"
    assert keys.worker("pod-1") == "kvmesh:{serving/llama}:worker:pod-1"
    assert RedisKeys("llama").workers == "kvmesh:{default/llama}:workers"  # a bare name: namespace default
    assert RedisKeys("other/llama").workers != keys.workers


def test_policy_defaults_come_from_the_crd_alone() -> None:
    assert (DEFAULTS.min_replicas, DEFAULTS.max_replicas, DEFAULTS.target) == (1, 4, 8.0)
    assert (DEFAULTS.scale_up_window, DEFAULTS.scale_down_window, DEFAULTS.tolerance) == (0, 300, 0.1)


def test_aggregate_skips_stale_and_malformed_workers() -> None:
    now = 1000.0
    hashes = [
        {b"running": b"3", b"waiting": b"2", b"kv_usage": b"0.5", b"heartbeat": b"999"},
        {b"running": b"1", b"waiting": b"0", b"kv_usage": b"0.1", b"heartbeat": b"995.5"},
        {b"running": b"9", b"waiting": b"9", b"kv_usage": b"0.9", b"heartbeat": b"100"},  # stale
        {b"running": b"x", b"heartbeat": b"1000"},  # malformed
        {},  # expired between SMEMBERS and HGETALL
    ]
    snap = aggregate(hashes, now, stale_after=30)
    assert (snap.workers, snap.running, snap.waiting) == (2, 4, 2)
    assert abs(snap.kv_usage - 0.3) < 1e-9


def test_windows_shorter_than_the_sampling_period() -> None:
    """A window shorter than the time since the last sample still decides on the latest sample."""
    policy = make_policy(target=4, max_replicas=4, scale_up_window=0, scale_down_window=6)
    samples = [load(100, 4, 0), load(110, 4, 0)]
    assert decide(4, samples, policy, now=125).desired == 1
    assert decide(1, [load(100, 1, 40)], policy, now=125).desired == 4
