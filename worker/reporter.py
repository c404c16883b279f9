"""Publishes one worker's load and prefix-cache block events to the Redis metadata store.

Started by the worker server when a Redis URL is given. Heartbeats (load + address) keep the
worker in the registry; block events keep the prefix index precise. When Redis is unreachable the
reporter drops its block subscription and retries every ``retry_max_s`` at most (1 s: gateways
route on their last known registry only until workers re-register, so a long backoff would open a
window without workers); after reconnecting it subscribes again, and the engine's first event (a
snapshot) resynchronizes the index. A heartbeat that finds its registry entry gone (expired, or
Redis restarted empty) triggers the same resync.

``registered`` is set at the first registration: the server turns health SERVING only then, so a
worker that cannot register (wrong password, unknown host) is not Ready. Failures are logged in one
line with their cause when the cause changes, and again every ``log_every_s`` while it persists.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from kvmesh.redact import redact_url
from kvmesh.store.base import WORKER_TTL_S, StoreError, WorkerInfo
from kvmesh.store.redis_store import RedisStore

log = logging.getLogger(__name__)


class _Resync(Exception):
    """The registry lost this worker; restart the block subscription for a fresh snapshot."""


class Reporter:
    def __init__(
        self,
        engine: Any,
        redis_url: str,
        deployment: str,
        worker_id: str,
        address: str,
        model: str,
        heartbeat_s: float = 1.0,
        ttl_s: float = WORKER_TTL_S,
        load_poll_s: float = 0.1,
        retry_max_s: float = 1.0,
        log_every_s: float = 30.0,
    ) -> None:
        self.engine = engine
        self.store = RedisStore(redis_url, deployment, socket_timeout_s=2.0)  # snapshots can be large
        self.where = redact_url(redis_url)
        self.retry_max_s = retry_max_s
        self.log_every_s = log_every_s
        self.registered = asyncio.Event()
        self.worker_id = worker_id
        self.address = address
        self.model = model
        self.heartbeat_s = heartbeat_s
        self.ttl_s = ttl_s
        self.load_poll_s = min(load_poll_s, heartbeat_s)
        self.connected = False
        self._published: tuple[int, int] = (-1, -1)

    async def run(self) -> None:
        """Reports until cancelled, reconnecting whenever Redis fails."""
        backoff = 0.1
        last_cause, logged_at = "", 0.0
        while True:
            try:
                await self._session()
            except _Resync as e:
                log.info("Re-registering worker_id=%s: %s", self.worker_id, e)
                self.connected, backoff = False, 0.0
            except StoreError as e:
                if self.connected:
                    log.warning("Lost the metadata store at %s (%s); reconnecting", self.where, e)
                    self.connected, backoff = False, 0.1
                    last_cause, logged_at = str(e), time.monotonic()
                elif str(e) != last_cause or time.monotonic() - logged_at > self.log_every_s:
                    log.error(
                        "Cannot register worker_id=%s in the metadata store at %s: %s (retrying every "
                        "%.1fs; not ready until registered)", self.worker_id, self.where, e, self.retry_max_s,
                    )  # fmt: skip
                    last_cause, logged_at = str(e), time.monotonic()
            await asyncio.sleep(backoff)
            backoff = min(max(backoff * 2, 0.1), self.retry_max_s)

    async def close(self) -> None:
        """Deregisters the worker (best effort) and closes the connection."""
        with contextlib.suppress(StoreError):
            await self.store.remove_worker(self.worker_id)
        await self.store.close()

    async def _session(self) -> None:
        await self._heartbeat()  # raises StoreError while Redis is down
        self.connected = True
        self.registered.set()
        log.info("Registered worker_id=%s in the metadata store at %s", self.worker_id, self.where)
        subscription = self.engine.subscribe_blocks()
        events = asyncio.ensure_future(self._forward_blocks(subscription))
        beats = asyncio.ensure_future(self._heartbeats())
        try:
            done, _ = await asyncio.wait({events, beats}, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                task.result()
        finally:
            for task in (events, beats):
                task.cancel()
            await asyncio.gather(events, beats, return_exceptions=True)
            close = getattr(subscription, "close", None)
            if close is not None:
                result = close()
                if asyncio.iscoroutine(result):
                    await result

    async def _heartbeats(self) -> None:
        """A heartbeat every ``heartbeat_s``, and sooner when the load changed: gateways weigh
        workers by it, and a load a second old keeps finished requests on the books."""
        last_beat = time.monotonic()
        while True:
            await asyncio.sleep(self.load_poll_s)
            load = self._load_key()
            if load == self._published and time.monotonic() - last_beat < self.heartbeat_s:
                continue
            last_beat = time.monotonic()
            if not await self._heartbeat():
                raise _Resync("registry entry was missing")

    def _load_key(self) -> tuple[int, int]:
        stats = self.engine.load()
        return stats.running, stats.waiting

    async def _heartbeat(self) -> bool:
        stats = self.engine.load()
        info = WorkerInfo(
            worker_id=self.worker_id,
            address=self.address,
            model=self.model,
            block_size=stats.block_size,
            running=stats.running,
            waiting=stats.waiting,
            kv_usage=stats.kv_usage,
            num_blocks=stats.num_blocks,
            heartbeat=time.time(),
        )
        existed = await self.store.upsert_worker(info, self.ttl_s)
        self._published = (stats.running, stats.waiting)
        return existed

    async def _forward_blocks(self, subscription: Any) -> None:
        async for event in subscription:
            await self.store.apply_blocks(self.worker_id, event.stored, event.removed, event.snapshot)
