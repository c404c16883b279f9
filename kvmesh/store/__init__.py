"""Shared metadata store: worker registry with load, and the prefix index (see ``base``)."""

from kvmesh.store.base import (
    ROUTE_TTL_S,
    WORKER_TTL_S,
    MetadataStore,
    RoutingView,
    StoreError,
    WorkerInfo,
)
from kvmesh.store.memory import InProcessStore

__all__ = [
    "ROUTE_TTL_S",
    "WORKER_TTL_S",
    "InProcessStore",
    "MetadataStore",
    "RedisStore",
    "RoutingView",
    "StoreError",
    "WorkerInfo",
]


def __getattr__(name: str):  # RedisStore imports redis only when asked for
    if name == "RedisStore":
        from kvmesh.store.redis_store import RedisStore

        return RedisStore
    raise AttributeError(name)
