"""The metadata store's contract: a worker registry carrying load, and a prefix index.

Two implementations share it: ``RedisStore`` (production; shared by every gateway replica,
the workers' reporters and the operator's autoscaler) and ``InProcessStore`` (the embedded
default of ``kvmesh up``, fed by one gateway from the workers' gRPC streams).

The prefix index maps a chained block hash (``kvmesh.prefix``) to the workers holding it. An
entry is *precise* when a worker reported the block stored (it stays until the worker reports
it evicted) or *approximate* when a gateway routed that prefix to the worker (it expires after
a short TTL, covering the time until the worker's own event arrives).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

WORKER_TTL_S = 5.0  # a worker that stops heartbeating leaves the pool after this
ROUTE_TTL_S = 30.0  # lifetime of an approximate (routing-decision) index entry
BLOCK_TTL_S = 3600.0  # safety net for precise entries of workers that died without deregistering


class StoreError(Exception):
    """The store could not be reached or answered badly; callers degrade, never fail requests."""


@dataclass(slots=True)
class WorkerInfo:
    """One worker as the registry knows it: where it is and how loaded it was at ``heartbeat``."""

    worker_id: str
    address: str
    model: str = ""
    block_size: int = 16
    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0
    num_blocks: int = 0
    heartbeat: float = field(default_factory=time.time)  # unix seconds

    @property
    def load(self) -> int:
        return self.running + self.waiting

    def to_fields(self) -> dict[str, str]:
        return {
            "worker_id": self.worker_id,
            "address": self.address,
            "model": self.model,
            "block_size": str(self.block_size),
            "running": str(self.running),
            "waiting": str(self.waiting),
            "kv_usage": f"{self.kv_usage:.4f}",
            "num_blocks": str(self.num_blocks),
            "heartbeat": f"{self.heartbeat:.3f}",
        }

    @classmethod
    def from_fields(cls, fields: dict[str, str]) -> WorkerInfo:
        return cls(
            worker_id=fields["worker_id"],
            address=fields.get("address", ""),
            model=fields.get("model", ""),
            block_size=int(fields.get("block_size", 16)),
            running=int(fields.get("running", 0)),
            waiting=int(fields.get("waiting", 0)),
            kv_usage=float(fields.get("kv_usage", 0.0)),
            num_blocks=int(fields.get("num_blocks", 0)),
            heartbeat=float(fields.get("heartbeat", 0.0)),
        )


@dataclass(slots=True)
class RoutingView:
    """What one routing decision needs, read in one round trip: live workers and, for each
    worker holding a leading run of the prompt's blocks, how many leading blocks it holds."""

    workers: list[WorkerInfo]
    matches: dict[str, int]  # worker_id -> number of leading blocks cached


class MetadataStore(Protocol):
    async def upsert_worker(self, info: WorkerInfo, ttl_s: float = WORKER_TTL_S) -> bool:
        """Registers or refreshes a worker; returns False when it was not registered before
        (first heartbeat, expiry, or a store that lost its data), so the caller can resync."""
        ...

    async def remove_worker(self, worker_id: str) -> None: ...

    async def apply_blocks(
        self, worker_id: str, stored: Sequence[int], removed: Sequence[int], snapshot: bool = False
    ) -> None:
        """Applies a worker's block event; a snapshot replaces everything known for the worker."""
        ...

    async def record_route(self, worker_id: str, hashes: Sequence[int], ttl_s: float = ROUTE_TTL_S) -> None:
        """Adds approximate entries: ``worker_id`` is about to cache ``hashes``."""
        ...

    async def lookup(self, hashes: Sequence[int]) -> RoutingView: ...

    async def list_workers(self) -> list[WorkerInfo]: ...

    async def close(self) -> None: ...
