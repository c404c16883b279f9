"""The gateway's view of its workers: the store's registry and prefix index, plus what only this
gateway knows (open channels, in-flight counts, workers it just saw fail).

``WorkerPool.view`` is the one store read per routing decision. When the store fails the pool
keeps routing on its last known worker list (no prefix matches, so the router falls back to
consistent hashing), reports degraded, and probes the store in the background until it answers.

A store that answers again may have lost its data (Redis restarted empty) while the workers have
not re-registered yet. So an empty registry never replaces a known worker list, however long the
outage lasted, and for ``rejoin_s`` after a reconnect (or after the registry was last seen empty)
known workers missing from the registry stay routable. A worker that really left fails its next
call with UNAVAILABLE, which retries elsewhere and drops it (``mark_down``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import grpc

from kvmesh.gateway.metrics import GatewayMetrics
from kvmesh.gateway.router import Candidate
from kvmesh.rpc import CHANNEL_OPTIONS
from kvmesh.store import MetadataStore, RoutingView, StoreError, WorkerInfo
from kvmesh.store.base import WORKER_TTL_S
from kvmesh.tls import ClientTls
from kvmesh.v1 import inference_pb2_grpc

log = logging.getLogger(__name__)


@dataclass(slots=True)
class WorkerConn:
    worker_id: str
    address: str
    channel: grpc.aio.Channel
    stub: inference_pb2_grpc.InferenceStub
    inflight: int = 0
    down_until: float = 0.0  # monotonic; set when a call failed with UNAVAILABLE
    info: WorkerInfo | None = field(default=None)


class WorkerPool:
    def __init__(
        self,
        store: MetadataStore,
        metrics: GatewayMetrics,
        max_inflight: int = 64,
        down_s: float = 5.0,
        probe_s: float = 1.0,
        local_load_only: bool = False,
        tls: ClientTls | None = None,
    ) -> None:
        self.tls = tls or ClientTls()  # how to dial workers (plaintext unless given a CA)
        self.store = store
        self.metrics = metrics
        self.max_inflight = max_inflight
        self.down_s = down_s
        self.probe_s = probe_s
        # One gateway in front of its workers (in-process store) counts every request itself;
        # workers' reports lag by a poll and would keep finished requests on the books.
        self.local_load_only = local_load_only
        self.conns: dict[str, WorkerConn] = {}
        self.known: list[WorkerInfo] = []  # last worker list the store returned
        self._known_at = 0.0
        # After a reconnect, how long known workers missing from the registry stay routable: a
        # worker re-registers within a heartbeat plus its reconnect backoff (about 1 s each).
        self.rejoin_s = WORKER_TTL_S
        self._rejoin_until = 0.0
        self.degraded = False
        self._probe: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()  # background writes and channel closes

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def view(self, hashes: Sequence[int]) -> RoutingView:
        if not self.degraded:
            try:
                view = await self.store.lookup(hashes)
            except StoreError as e:
                self.metrics.store_errors.labels("lookup").inc()
                self._degrade(e)
            else:
                if view.workers or not self.known:
                    view.workers = self._rejoined(view.workers)
                    self._remember(view.workers)
                    return view
                # An empty registry while we know workers: the store lost its data (a restart) and
                # the workers have not re-registered yet. Route on what we knew.
                self.metrics.store_errors.labels("empty_registry").inc()
                self._rejoin_until = time.monotonic() + self.rejoin_s
        return RoutingView(workers=list(self.known), matches={})

    def _rejoined(self, workers: list[WorkerInfo]) -> list[WorkerInfo]:
        """The registry's workers plus, while re-registration may still be under way, the known
        ones it does not list yet."""
        if time.monotonic() >= self._rejoin_until:
            return workers
        listed = {w.worker_id for w in workers}
        return workers + [w for w in self.known if w.worker_id not in listed]

    def candidates(self, view: RoutingView, exclude: set[str], model: str = "") -> list[Candidate]:
        """The workers a request may go to: of ``model`` (any when empty), not excluded, not down."""
        now = time.monotonic()
        out = []
        for info in view.workers:
            if info.worker_id in exclude or (model and info.model != model):
                continue
            conn = self.conn(info)
            if conn.down_until > now:
                continue
            load = conn.inflight if self.local_load_only else max(info.load, conn.inflight)
            out.append(
                Candidate(
                    worker_id=info.worker_id,
                    load=load,
                    matched_blocks=view.matches.get(info.worker_id, 0),
                    saturated=conn.inflight >= self.max_inflight,
                )
            )
        return out

    def conn(self, info: WorkerInfo) -> WorkerConn:
        conn = self.conns.get(info.worker_id)
        if conn is None or conn.address != info.address:
            if conn is not None:
                self._spawn(conn.channel.close())
            channel = self.tls.channel(info.address, CHANNEL_OPTIONS)
            conn = WorkerConn(
                info.worker_id, info.address, channel, inference_pb2_grpc.InferenceStub(channel)
            )
            self.conns[info.worker_id] = conn
        conn.info = info
        return conn

    def begin(self, conn: WorkerConn) -> None:
        conn.inflight += 1
        self.metrics.inflight.labels(conn.worker_id).set(conn.inflight)

    def end(self, conn: WorkerConn) -> None:
        conn.inflight -= 1
        self.metrics.inflight.labels(conn.worker_id).set(conn.inflight)

    def mark_down(self, conn: WorkerConn) -> None:
        """The worker refused a connection: leave it out for a while, whatever the registry says."""
        conn.down_until = time.monotonic() + self.down_s
        self.known = [w for w in self.known if w.worker_id != conn.worker_id]

    def record_route(self, worker_id: str, hashes: Sequence[int]) -> None:
        """Adds approximate index entries without waiting; skipped while degraded."""
        if self.degraded or not hashes or len(self._tasks) > 256:  # never queue up behind a slow store
            return
        self._spawn(self._record(worker_id, list(hashes)))

    async def workers(self) -> list[WorkerInfo]:
        """The live workers; the list of the last routing decision when it is fresh, so asking
        costs no store read on a busy gateway."""
        if self.known and time.monotonic() - self._known_at < 1.0:
            return self.known
        return (await self.view([])).workers

    async def any_conn(
        self, exclude: set[str] | frozenset[str] = frozenset(), model: str = ""
    ) -> WorkerConn | None:
        """A live worker of ``model`` (any when empty), fewest in flight first, for Tokenize and
        ListModels."""
        workers = await self.workers()
        now = time.monotonic()
        conns = [
            self.conn(w) for w in workers if w.worker_id not in exclude and (not model or w.model == model)
        ]
        conns = [c for c in conns if c.down_until <= now]
        if not conns:
            return None
        return min(conns, key=lambda c: c.inflight)

    async def close(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
        for conn in self.conns.values():
            await conn.channel.close()

    async def _record(self, worker_id: str, hashes: list[int]) -> None:
        try:
            await self.store.record_route(worker_id, hashes)
        except StoreError as e:
            self.metrics.store_errors.labels("record_route").inc()
            self._degrade(e)

    def _remember(self, workers: list[WorkerInfo]) -> None:
        self.known = workers
        if workers:
            self._known_at = time.monotonic()
        self.metrics.workers.set(len(workers))
        live = {w.worker_id for w in workers}
        for worker_id in [w for w in self.conns if w not in live and self.conns[w].inflight == 0]:
            conn = self.conns.pop(worker_id)
            self._spawn(conn.channel.close())
            with contextlib.suppress(KeyError):
                self.metrics.inflight.remove(worker_id)

    def _degrade(self, error: Exception) -> None:
        if not self.degraded:
            log.warning("Lost the metadata store; routing on local state error=%s", error)
        self.degraded = True
        self.metrics.degraded.set(1)
        if self._probe is None or self._probe.done():
            self._probe = asyncio.ensure_future(self._reconnect())

    async def _reconnect(self) -> None:
        while True:
            await asyncio.sleep(self.probe_s)
            try:
                workers = await self.store.list_workers()
            except StoreError:
                self.metrics.store_errors.labels("probe").inc()
                continue
            self._rejoin_until = time.monotonic() + self.rejoin_s
            if workers or not self.known:
                self._remember(self._rejoined(workers))
            self.degraded = False
            self.metrics.degraded.set(0)
            log.info("Reconnected to the metadata store workers=%d", len(workers))
            return
