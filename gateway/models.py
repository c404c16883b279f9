"""Which models the gateway serves and where each lives: one worker pool per deployment, and any
pool may hold workers of several models (``kvmesh up --model`` per worker, or deployments that
share a model). A request's ``model`` picks the pool and the workers in it that serve that model;
an empty ``model`` is allowed while only one model is served.

Read from the registry each worker keeps fresh (its heartbeat carries its model name), so a new
``InferenceDeployment`` or a new model appears as soon as its first worker registers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import grpc

from kvmesh.gateway.pool import WorkerPool
from kvmesh.requests import RequestError
from kvmesh.store import WorkerInfo
from kvmesh.v1 import inference_pb2


@dataclass(slots=True)
class ModelTarget:
    """Where requests for one model go: the pool holding its workers and the block size they hash."""

    name: str
    pool: WorkerPool
    block_size: int


class ModelDirectory:
    def __init__(self, pools: list[WorkerPool], fresh_s: float = 1.0) -> None:
        self.pools = pools
        self.fresh_s = fresh_s
        self._targets: dict[str, ModelTarget] = {}
        self._infos: dict[str, inference_pb2.ModelInfo] = {}
        self._read_at = 0.0

    async def refresh(self, force: bool = False) -> dict[str, ModelTarget]:
        """Model name -> target, from each pool's worker list (at most one store read per pool
        per ``fresh_s``; pools reuse the worker list of their last routing decision)."""
        if not force and self._targets and time.monotonic() - self._read_at < self.fresh_s:
            return self._targets
        targets: dict[str, ModelTarget] = {}
        infos: dict[str, inference_pb2.ModelInfo] = {}
        for pool in self.pools:
            for worker in await pool.workers():
                if worker.model and worker.model not in targets:
                    targets[worker.model] = ModelTarget(worker.model, pool, worker.block_size)
                    infos[worker.model] = model_info(worker)
        self._targets, self._infos, self._read_at = targets, infos, time.monotonic()
        return targets

    async def resolve(self, model: str) -> ModelTarget:
        """The target of a request's ``model``: NOT_FOUND for a model nobody serves, UNAVAILABLE
        when no worker is registered, INVALID_ARGUMENT for an empty name among several models."""
        targets = await self.refresh()
        if model and model not in targets:
            targets = await self.refresh(force=True)  # a model whose first worker just registered
        if not targets:
            raise RequestError(grpc.StatusCode.UNAVAILABLE, "no worker is registered")
        if not model:
            if len(targets) > 1:
                names = ", ".join(sorted(targets))
                raise RequestError(
                    grpc.StatusCode.INVALID_ARGUMENT, f"set a model: this gateway serves {names}"
                )
            return next(iter(targets.values()))
        target = targets.get(model)
        if target is None:
            names = ", ".join(sorted(targets))
            raise RequestError(
                grpc.StatusCode.NOT_FOUND, f"unknown model {model!r}; this gateway serves {names}"
            )
        return target

    async def list(self) -> list[inference_pb2.ModelInfo]:
        await self.refresh()
        return [self._infos[name] for name in sorted(self._infos)]


def model_info(worker: WorkerInfo) -> inference_pb2.ModelInfo:
    # The registry does not carry max_model_len; ListModels through a worker does (gateway core).
    return inference_pb2.ModelInfo(id=worker.model, block_size=worker.block_size)
