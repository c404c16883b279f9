"""The kvmesh worker: a paged-attention inference engine and its gRPC server."""

from typing import Any

__all__ = ["LLM", "SamplingParams"]


def __getattr__(name: str) -> Any:
    # Lazy, so importing kvmesh.worker's submodules (or the gateway) does not pull in torch.
    if name == "LLM":
        from kvmesh.worker.engine.llm import LLM

        return LLM
    if name == "SamplingParams":
        from kvmesh.worker.engine.sampling_params import SamplingParams

        return SamplingParams
    raise AttributeError(name)
