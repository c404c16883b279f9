"""The in-process store keeps the same semantics as the Redis one (tested on a real server)."""

from __future__ import annotations

from kvmesh.prefix import block_hashes
from kvmesh.store import InProcessStore, WorkerInfo


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def hashes(n: int) -> list[int]:
    return block_hashes(list(range(16 * n)), 16, model="m")


async def test_registry_expires_without_heartbeats():
    clock = Clock()
    store = InProcessStore(clock)
    assert await store.upsert_worker(WorkerInfo("a", "a:1"), ttl_s=2) is False
    assert await store.upsert_worker(WorkerInfo("a", "a:1"), ttl_s=2) is True
    clock.t += 1.9
    assert [w.worker_id for w in await store.list_workers()] == ["a"]
    clock.t += 0.2
    assert await store.list_workers() == []
    assert await store.upsert_worker(WorkerInfo("a", "a:1"), ttl_s=2) is False  # expired: resync


async def test_prefix_index_events_snapshot_and_routes():
    clock = Clock()
    store = InProcessStore(clock)
    h = hashes(5)
    for w in "abc":
        await store.upsert_worker(WorkerInfo(w, w), ttl_s=60)
    await store.apply_blocks("a", h[:2], [])
    await store.apply_blocks("b", h, [])
    await store.apply_blocks("c", h[1:], [])
    assert (await store.lookup(h)).matches == {"a": 2, "b": 5}
    await store.apply_blocks("b", [], [h[3]])
    assert (await store.lookup(h)).matches == {"a": 2, "b": 3}
    await store.apply_blocks("b", h[:1], [], snapshot=True)
    assert (await store.lookup(h)).matches == {"a": 2, "b": 1}
    await store.record_route("c", h, ttl_s=5)
    assert (await store.lookup(h)).matches == {"a": 2, "b": 1, "c": 5}
    await store.record_route("a", h, ttl_s=5)  # never downgrades a's precise blocks
    clock.t += 6
    await store.upsert_worker(WorkerInfo("a", "a"), ttl_s=60)
    await store.upsert_worker(WorkerInfo("b", "b"), ttl_s=60)
    await store.upsert_worker(WorkerInfo("c", "c"), ttl_s=60)
    assert (await store.lookup(h)).matches == {"a": 2, "b": 1}
    await store.remove_worker("a")
    view = await store.lookup(h)
    assert view.matches == {"b": 1} and [w.worker_id for w in view.workers] == ["b", "c"]
