"""RedisStore and the worker Reporter against a real redis-server."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis.asyncio as aioredis

from kvmesh.prefix import block_hashes
from kvmesh.store import StoreError, WorkerInfo
from kvmesh.store.redis_store import RedisStore
from kvmesh.worker.engine.outputs import BlockEvent, LoadStats
from kvmesh.worker.reporter import Reporter

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


class EngineEvents:
    """The two calls the reporter makes on an engine (``load``, ``subscribe_blocks``), over a set."""

    def __init__(self) -> None:
        self.blocks: set[int] = set()
        self.running = 0
        self.subscriptions: list[_Subscription] = []

    def load(self) -> LoadStats:
        return LoadStats(running=self.running, waiting=0, kv_usage=0.25, num_blocks=64, block_size=16)

    def subscribe_blocks(self) -> _Subscription:
        sub = _Subscription(self)
        sub.queue.put_nowait(BlockEvent(stored=sorted(self.blocks), snapshot=True))
        self.subscriptions.append(sub)
        return sub

    def store(self, hashes: list[int]) -> None:
        self.blocks.update(hashes)
        self._emit(BlockEvent(stored=list(hashes)))

    def evict(self, hashes: list[int]) -> None:
        self.blocks.difference_update(hashes)
        self._emit(BlockEvent(removed=list(hashes)))

    def _emit(self, event: BlockEvent) -> None:
        for sub in self.subscriptions:
            sub.queue.put_nowait(event)


class _Subscription:
    def __init__(self, engine: EngineEvents) -> None:
        self.engine = engine
        self.queue: asyncio.Queue[BlockEvent] = asyncio.Queue()

    def __aiter__(self) -> _Subscription:
        return self

    async def __anext__(self) -> BlockEvent:
        return await self.queue.get()

    def close(self) -> None:
        if self in self.engine.subscriptions:
            self.engine.subscriptions.remove(self)


async def eventually(check, timeout_s: float = 10.0):
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            result = await check()
            if result:
                return result
        except StoreError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


def prompt_hashes(n_blocks: int, salt: str = "") -> list[int]:
    return block_hashes(list(range(1000, 1000 + 16 * n_blocks)), 16, model="m", cache_salt=salt)


async def test_registry_keys_and_expiry(redis_server):
    store = RedisStore(redis_server.url, "team-1/dep-a")
    raw = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        info = WorkerInfo("w1", "127.0.0.1:1", model="m", running=3, waiting=2, kv_usage=0.5)
        assert await store.upsert_worker(info, ttl_s=0.5) is False  # first registration
        assert await store.upsert_worker(info, ttl_s=0.5) is True
        # The keys the operator's autoscaler reads.
        fields = await raw.hgetall("kvmesh:{team-1/dep-a}:worker:w1")
        assert (fields["running"], fields["waiting"], float(fields["kv_usage"])) == ("3", "2", 0.5)
        assert abs(float(fields["heartbeat"]) - time.time()) < 5
        assert 0 < await raw.pttl("kvmesh:{team-1/dep-a}:worker:w1") <= 500
        assert await raw.smembers("kvmesh:{team-1/dep-a}:workers") == {"w1"}
        assert [w.worker_id for w in await store.list_workers()] == ["w1"]
        await asyncio.sleep(0.7)
        assert await store.list_workers() == []
        assert await raw.smembers("kvmesh:{team-1/dep-a}:workers") == set()  # pruned by the lookup
        # Another deployment is invisible.
        other = RedisStore(redis_server.url, "team-1/dep-b")
        await other.upsert_worker(WorkerInfo("w9", "x"))
        assert await store.list_workers() == []
        await other.close()
    finally:
        await store.close()
        await raw.aclose()


async def test_prefix_index_longest_leading_run(redis_server):
    store = RedisStore(redis_server.url, "d")
    try:
        hashes = prompt_hashes(6)
        for w in ("a", "b", "c"):
            await store.upsert_worker(WorkerInfo(w, f"{w}:1"))
        await store.apply_blocks("a", hashes[:2], [])
        await store.apply_blocks("b", hashes[:5], [])
        await store.apply_blocks("c", hashes[1:6], [])  # lacks block 0: no leading run
        view = await store.lookup(hashes)
        assert [w.worker_id for w in view.workers] == ["a", "b", "c"]
        assert view.matches == {"a": 2, "b": 5}
        await store.apply_blocks("b", [], [hashes[2]])  # evicted in the middle
        assert (await store.lookup(hashes)).matches == {"a": 2, "b": 2}
        await store.apply_blocks("b", [hashes[0]], [], snapshot=True)  # snapshot replaces
        assert (await store.lookup(hashes)).matches == {"a": 2, "b": 1}
        await store.remove_worker("a")
        assert (await store.lookup(hashes)).matches == {"b": 1}
    finally:
        await store.close()


async def test_route_entries_are_approximate_and_expire(redis_server):
    store = RedisStore(redis_server.url, "d")
    try:
        hashes = prompt_hashes(4)
        await store.upsert_worker(WorkerInfo("a", "a:1"))
        await store.upsert_worker(WorkerInfo("b", "b:1"))
        await store.apply_blocks("a", hashes[:1], [])
        await store.record_route("a", hashes, ttl_s=0.3)
        await store.record_route("b", hashes[:3], ttl_s=0.3)
        assert (await store.lookup(hashes)).matches == {"a": 4, "b": 3}
        await asyncio.sleep(0.45)
        # The routed entries expired; the worker-reported one stays.
        assert (await store.lookup(hashes)).matches == {"a": 1}
    finally:
        await store.close()


async def test_reporter_publishes_load_and_block_events(redis_server):
    engine = EngineEvents()
    hashes = prompt_hashes(4)
    engine.blocks.update(hashes[:1])
    reporter = Reporter(engine, redis_server.url, "d", "w1", "127.0.0.1:5000", "m", heartbeat_s=0.1)
    store = RedisStore(redis_server.url, "d")
    task = asyncio.create_task(reporter.run())
    try:
        view = await eventually(lambda: _view_with(store, hashes, {"w1": 1}))
        assert view.workers[0].address == "127.0.0.1:5000" and view.workers[0].num_blocks == 64
        engine.store(hashes[1:3])
        await eventually(lambda: _view_with(store, hashes, {"w1": 3}))
        engine.running = 7
        await eventually(lambda: _load_is(store, 7))
        engine.evict(hashes[:1])
        await eventually(lambda: _view_with(store, hashes, {}))
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await reporter.close()
    assert await store.list_workers() == []  # close() deregistered
    assert (await store.lookup(hashes)).matches == {}
    await store.close()


async def test_redis_restart_mid_traffic(redis_server):
    """Redis dies and comes back empty while lookups run: lookups fail only with StoreError, and
    the reporter re-registers the worker and resends its blocks without anyone's help."""
    engine = EngineEvents()
    hashes = prompt_hashes(4)
    engine.blocks.update(hashes)
    reporter = Reporter(engine, redis_server.url, "d", "w1", "127.0.0.1:5000", "m", heartbeat_s=0.1)
    store = RedisStore(redis_server.url, "d")
    task = asyncio.create_task(reporter.run())
    outcomes: list[str] = []
    stop = asyncio.Event()

    async def traffic() -> None:
        while not stop.is_set():
            try:
                view = await store.lookup(hashes)
                outcomes.append("hit" if view.matches.get("w1") == 4 else "miss")
            except StoreError:
                outcomes.append("error")
            await asyncio.sleep(0.02)

    traffic_task = asyncio.create_task(traffic())
    try:
        await eventually(lambda: _view_with(store, hashes, {"w1": 4}))
        await asyncio.to_thread(redis_server.restart)
        await asyncio.sleep(0.1)
        engine.store(prompt_hashes(2, salt="after"))  # an event during the outage
        await eventually(lambda: _view_with(store, hashes, {"w1": 4}), timeout_s=15)
        after = prompt_hashes(2, salt="after")
        assert (await store.lookup(after)).matches == {"w1": 2}
        survived = not task.done()
        await asyncio.sleep(0.2)  # traffic goes on after the recovery
    finally:
        stop.set()
        await traffic_task
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await reporter.close()
        await store.close()
    assert survived, "the reporter's run() ended instead of reconnecting"
    assert outcomes[-1] == "hit" and "hit" in outcomes[:5], "".join(o[0] for o in outcomes)
    assert set(outcomes) & {"error", "miss"}, "the outage was not observed"


async def _view_with(store: RedisStore, hashes: list[int], matches: dict[str, int]):
    view = await store.lookup(hashes)
    return view if (view.workers and view.matches == matches) else None


async def _load_is(store: RedisStore, running: int) -> bool:
    workers = await store.list_workers()
    return bool(workers) and workers[0].running == running


async def test_same_name_in_two_namespaces_is_two_pools(redis_server):
    """Deployments named alike in different namespaces share the chart's Redis but never a pool:
    the gateway of one never routes to the other's workers (possibly another model)."""
    a = RedisStore(redis_server.url, "team-a/llama")
    b = RedisStore(redis_server.url, "team-b/llama")
    bare = RedisStore(redis_server.url, "llama")  # kvmesh up and tests: namespace "default"
    try:
        await a.upsert_worker(WorkerInfo("wa", "10.0.0.1:1", model="llama-8b"))
        await b.upsert_worker(WorkerInfo("wb", "10.0.0.2:1", model="qwen-7b"))
        hashes = prompt_hashes(3)
        await a.apply_blocks("wa", hashes, [])
        assert [w.worker_id for w in await a.list_workers()] == ["wa"]
        assert [w.worker_id for w in await b.list_workers()] == ["wb"]
        assert await bare.list_workers() == []
        assert (await b.lookup(hashes)).matches == {}
        assert (await a.lookup(hashes)).matches == {"wa": 3}
    finally:
        for store in (a, b, bare):
            await store.close()


def _redis_with_password(tmp_path, password: str):
    import shutil
    import subprocess

    from conftest import free_port, wait_for_port

    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    escaped = password.replace("\\", "\\\\").replace('"', '\\"')
    (tmp_path / "redis.conf").write_text(f'requirepass "{escaped}"\n')
    port = free_port()
    proc = subprocess.Popen(
        [binary, str(tmp_path / "redis.conf"), "--port", str(port), "--bind", "127.0.0.1", "--save", ""],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=tmp_path,
    )
    wait_for_port(port, 10, proc)
    return proc, f"redis://127.0.0.1:{port}/0"


HARD_PASSWORD = 'p@ss/w:rd#?&% "q"'


@pytest.mark.parametrize("source", ["env", "file"])
async def test_password_from_env_or_file_with_url_reserved_characters(tmp_path, monkeypatch, source):
    """The password reaches the store by env (or a mounted file), never through the URL: nothing
    to URL-encode, nothing in argv, and characters like @ / : # work as they are."""
    from kvmesh.operator.autoscaler import RedisLoadSource
    from kvmesh.operator.routing import RoutingPublisher
    from kvmesh.operator.spec import RoutingSpec

    proc, url = _redis_with_password(tmp_path, HARD_PASSWORD)
    try:
        unauthenticated = RedisStore(url, "ns/d")
        with pytest.raises(StoreError):
            await unauthenticated.list_workers()
        await unauthenticated.close()
        if source == "env":
            monkeypatch.setenv("KVMESH_REDIS_PASSWORD", HARD_PASSWORD)
        else:
            (tmp_path / "password").write_text(HARD_PASSWORD + "\n")  # as a mounted Secret file may end
            monkeypatch.setenv("KVMESH_REDIS_PASSWORD_FILE", str(tmp_path / "password"))
        store = RedisStore(url, "ns/d")
        try:
            await store.upsert_worker(WorkerInfo("w1", "a:1", running=2))
            assert [w.worker_id for w in await store.list_workers()] == ["w1"]
            # The operator's side (sync client) authenticates the same way: it reads this load and
            # publishes the routing settings the gateway reads back.
            assert RedisLoadSource(url).read("ns/d").running == 2
            assert RoutingPublisher(url).publish("ns/d", RoutingSpec("least-load", 1.5))
            assert await store.routing() == {"policy": "least-load", "load_factor": "1.5"}
        finally:
            await store.close()
    finally:
        proc.terminate()
        proc.wait(10)
