"""The gateway's worker pool across a Redis restart that lost every registration, against a real
redis-server: an outage longer than any grace period still routes on the last known workers, known
workers stay routable while the others re-register, and the registry is the truth again after."""

from __future__ import annotations

import asyncio
import time

import pytest

from kvmesh.gateway.metrics import GatewayMetrics
from kvmesh.gateway.pool import WorkerPool
from kvmesh.store import WorkerInfo
from kvmesh.store.redis_store import RedisStore

from .conftest import Redis

pytestmark = [pytest.mark.integration, pytest.mark.faults, pytest.mark.timeout(60)]


def worker(i: int) -> WorkerInfo:
    return WorkerInfo(worker_id=f"w{i}", address=f"127.0.0.1:{50100 + i}", model="m")


async def test_known_workers_outlive_an_empty_registry(redis: Redis, monkeypatch):
    monkeypatch.setenv("KVMESH_REDIS_PASSWORD_FILE", str(redis.password_file))
    store, metrics = RedisStore(redis.url, "faults-pool"), GatewayMetrics()
    pool = WorkerPool(store, metrics, probe_s=0.1)
    pool.rejoin_s = 1.5
    try:
        for i in range(3):
            await store.upsert_worker(worker(i), ttl_s=60)
        assert [w.worker_id for w in (await pool.view([])).workers] == ["w0", "w1", "w2"]

        redis.stop()
        assert len((await pool.view([])).workers) == 3 and pool.degraded
        await asyncio.sleep(12)  # longer than any fixed grace after the last good read
        redis.start()  # back, and empty
        deadline = time.monotonic() + 5
        while pool.degraded:
            assert time.monotonic() < deadline, "the pool did not reconnect"
            assert len((await pool.view([])).workers) == 3
            await asyncio.sleep(0.05)
        for _ in range(3):  # an empty registry never replaces known workers
            assert [w.worker_id for w in (await pool.view([])).workers] == ["w0", "w1", "w2"]
            await asyncio.sleep(0.6)

        await store.upsert_worker(worker(1), ttl_s=60)  # one worker re-registers
        ids = sorted(w.worker_id for w in (await pool.view([])).workers)
        assert ids == ["w0", "w1", "w2"], "the others stay routable while they re-register"
        await store.upsert_worker(worker(0), ttl_s=60)
        await asyncio.sleep(pool.rejoin_s + 0.1)
        ids = sorted(w.worker_id for w in (await pool.view([])).workers)
        assert ids == ["w0", "w1"], "after the rejoin window the registry is the truth"
    finally:
        await pool.close()
        await store.close()
        metrics.close()
