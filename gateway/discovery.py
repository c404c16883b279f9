"""Feeds the in-process store from a static list of workers over their ``kvmesh.v1.Worker`` API.

One task per worker address: ``WatchBlocks`` streams the worker's block events (a snapshot first)
into the store, and ``GetLoad`` polls refresh its registry entry (load, heartbeat). A worker whose
stream or poll fails is removed from the store at once, so it leaves the routing pool within one
poll interval; the task reconnects with backoff and the next snapshot restores its blocks.

With Redis the workers' reporters do this job and the gateway needs no watcher.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import grpc

from kvmesh.store import MetadataStore, WorkerInfo
from kvmesh.tls import ClientTls
from kvmesh.v1 import worker_pb2, worker_pb2_grpc

log = logging.getLogger(__name__)


class StreamEnded(Exception):
    pass


def info_from_load(load: worker_pb2.Load, address: str) -> WorkerInfo:
    return WorkerInfo(
        worker_id=load.worker_id,
        address=address,
        model=load.model,
        block_size=load.block_size or 16,
        running=load.running,
        waiting=load.waiting,
        kv_usage=load.kv_usage,
        num_blocks=load.num_blocks,
        heartbeat=time.time(),
    )


class WorkerWatcher:
    def __init__(
        self, store: MetadataStore, addresses: list[str], poll_s: float = 0.5, tls: ClientTls | None = None
    ) -> None:
        self.store = store
        self.tls = tls or ClientTls()
        self.addresses = addresses
        self.poll_s = poll_s
        self.ttl_s = max(2.0, 4 * poll_s)
        self._tasks: list[asyncio.Task] = []

    def start(self) -> None:
        self._tasks = [asyncio.ensure_future(self._watch(a)) for a in self.addresses]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _watch(self, address: str) -> None:
        backoff = 0.2
        while True:
            worker_id = ""
            async with self.tls.channel(address, []) as channel:
                stub = worker_pb2_grpc.WorkerStub(channel)
                try:
                    load = await stub.GetLoad(worker_pb2.GetLoadRequest(), timeout=2.0)
                    worker_id = load.worker_id
                    await self.store.upsert_worker(info_from_load(load, address), self.ttl_s)
                    log.info("Watching worker worker_id=%s address=%s", worker_id, address)
                    backoff = 0.2
                    await self._follow(stub, address, worker_id)
                except grpc.aio.AioRpcError as e:
                    if worker_id:
                        log.warning(
                            "Lost worker worker_id=%s address=%s code=%s", worker_id, address, e.code()
                        )
                finally:
                    if worker_id:
                        await self.store.remove_worker(worker_id)
            await asyncio.sleep(backoff)
            backoff = min(2 * backoff, 2.0)

    async def _follow(self, stub: worker_pb2_grpc.WorkerStub, address: str, worker_id: str) -> None:
        """Streams block events and polls load until either fails."""
        events = stub.WatchBlocks(worker_pb2.WatchBlocksRequest())

        async def blocks() -> None:
            async for ev in events:
                await self.store.apply_blocks(worker_id, list(ev.stored), list(ev.removed), ev.snapshot)
                if ev.HasField("load"):
                    await self.store.upsert_worker(info_from_load(ev.load, address), self.ttl_s)

        async def loads() -> None:
            while True:
                await asyncio.sleep(self.poll_s)
                load = await stub.GetLoad(worker_pb2.GetLoadRequest(), timeout=max(1.0, 2 * self.poll_s))
                await self.store.upsert_worker(info_from_load(load, address), self.ttl_s)

        tasks = [asyncio.ensure_future(blocks()), asyncio.ensure_future(loads())]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()  # raises the stream's error
            raise StreamEnded("the block stream ended")
        finally:
            events.cancel()
            for task in tasks:
                task.cancel()
            with contextlib.suppress(Exception):
                await asyncio.gather(*tasks, return_exceptions=True)
