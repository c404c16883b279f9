"""In-process metadata store: the embedded default for one local gateway (``kvmesh up``).

Same semantics as the Redis store, held in dicts; the gateway feeds it from each worker's
``Worker.WatchBlocks`` stream and ``GetLoad`` polls (see ``kvmesh.gateway.discovery``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

from kvmesh.store.base import ROUTE_TTL_S, WORKER_TTL_S, RoutingView, WorkerInfo

PRECISE = math.inf  # expiry of an entry a worker reported itself


class InProcessStore:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._workers: dict[str, WorkerInfo] = {}
        self._expires: dict[str, float] = {}
        self._index: dict[int, dict[str, float]] = {}  # block hash -> worker_id -> expiry
        self._blocks: dict[str, set[int]] = {}  # worker_id -> precise blocks
        self._routes_since_sweep = 0

    async def upsert_worker(self, info: WorkerInfo, ttl_s: float = WORKER_TTL_S) -> bool:
        known = info.worker_id in self._live_ids()
        self._workers[info.worker_id] = info
        self._expires[info.worker_id] = self._clock() + ttl_s
        return known

    async def remove_worker(self, worker_id: str) -> None:
        self._workers.pop(worker_id, None)
        self._expires.pop(worker_id, None)
        self._drop_blocks(worker_id)

    async def apply_blocks(
        self, worker_id: str, stored: Sequence[int], removed: Sequence[int], snapshot: bool = False
    ) -> None:
        if snapshot:
            self._drop_blocks(worker_id)
        mine = self._blocks.setdefault(worker_id, set())
        for h in stored:
            self._index.setdefault(h, {})[worker_id] = PRECISE
            mine.add(h)
        for h in removed:
            holders = self._index.get(h)
            if holders is not None:
                holders.pop(worker_id, None)
                if not holders:
                    del self._index[h]
            mine.discard(h)

    async def record_route(self, worker_id: str, hashes: Sequence[int], ttl_s: float = ROUTE_TTL_S) -> None:
        expiry = self._clock() + ttl_s
        self._routes_since_sweep += 1
        if self._routes_since_sweep >= 1024:
            self._sweep_expired()
        for h in hashes:
            holders = self._index.setdefault(h, {})
            if holders.get(worker_id, 0.0) != PRECISE:
                holders[worker_id] = expiry

    async def lookup(self, hashes: Sequence[int]) -> RoutingView:
        live = self._live_ids()
        now = self._clock()
        matches: dict[str, int] = {}
        candidates = live
        for depth, h in enumerate(hashes, start=1):
            holders = self._index.get(h)
            if not holders:
                break
            candidates = {w for w in candidates if holders.get(w, 0.0) > now}
            if not candidates:
                break
            for w in candidates:
                matches[w] = depth
        return RoutingView(workers=[self._workers[w] for w in sorted(live)], matches=matches)

    async def list_workers(self) -> list[WorkerInfo]:
        return [self._workers[w] for w in sorted(self._live_ids())]

    async def close(self) -> None:
        pass

    def _live_ids(self) -> set[str]:
        now = self._clock()
        for w in [w for w, t in self._expires.items() if t <= now]:
            self._workers.pop(w, None)
            del self._expires[w]
        return set(self._workers)

    def _sweep_expired(self) -> None:
        self._routes_since_sweep = 0
        now = self._clock()
        for h in list(self._index):
            holders = self._index[h]
            for w in [w for w, t in holders.items() if t <= now]:
                del holders[w]
            if not holders:
                del self._index[h]

    def _drop_blocks(self, worker_id: str) -> None:
        for h in self._blocks.pop(worker_id, set()):
            holders = self._index.get(h)
            if holders is not None:
                holders.pop(worker_id, None)
                if not holders:
                    del self._index[h]
