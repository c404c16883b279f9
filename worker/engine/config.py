"""Engine settings. One flat dataclass: the CLI, the offline LLM class and the
operator's engine block all map onto these fields by name."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

CPU_KV_CACHE_BYTES = 1 << 30  # default KV pool on the CPU, where no memory profiling applies


@dataclass(slots=True)
class EngineConfig:
    model: str = "default"  # a Hugging Face directory, a .gguf file, or "default" (SmolLM2-135M-Instruct)
    served_model_name: str | None = None
    dtype: str = "auto"  # auto: bfloat16 on CUDA, float32 on the CPU
    device: str = "auto"
    block_size: int = 16
    num_blocks: int | None = None  # None: sized from memory
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None  # None: the model's own limit, capped by the KV pool
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True
    attention_backend: str = "auto"
    max_waiting: int = 1024
    tensor_parallel_size: int = 1  # ranks (GPUs, or CPU processes) one model copy is sharded over
    enforce_eager: bool = False
    seed: int = 0
    load_format: str = "auto"  # auto: the checkpoint's weights; dummy: random ones (benchmarks only)

    def validate(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.num_blocks is not None and self.num_blocks < 2:
            raise ValueError("num_blocks must be >= 2")
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError("gpu_memory_utilization must be in (0, 1]")
        if not 1 <= self.tensor_parallel_size <= 64:
            raise ValueError(f"tensor_parallel_size must be in 1..64, got {self.tensor_parallel_size}")
        if self.load_format not in ("auto", "dummy"):
            raise ValueError(f"load_format must be 'auto' or 'dummy', got {self.load_format!r}")
        if self.max_waiting < 1:
            raise ValueError("max_waiting must be >= 1")

    @classmethod
    def from_kwargs(cls, model: str, **kwargs: Any) -> EngineConfig:
        names = {f.name for f in fields(cls)}
        unknown = set(kwargs) - names
        if unknown:
            raise TypeError(f"unknown engine settings: {sorted(unknown)}")
        return cls(model=model, **kwargs)
