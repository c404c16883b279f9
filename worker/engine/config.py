"""Engine settings. One flat dataclass: the CLI, the offline LLM class and the
operator's engine block all map onto these fields by name."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

CPU_KV_CACHE_BYTES = 1 << 30  # default KV pool on the CPU, where no memory profiling applies
QUANTIZATIONS = ("auto", "none", "fp8", "gptq", "awq", "gguf")  # kvmesh.worker.model.quant
KV_CACHE_DTYPES = ("auto", "fp8")


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
    # The budget of a step while any sequence is decoding: prefill chunks beside decodes stay this
    # small, so streams keep an even pace (None: max_num_batched_tokens). See docs/benchmarks.md.
    decode_token_budget: int | None = 1024
    max_model_len: int | None = None  # None: the model's own limit, capped by the KV pool
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True
    attention_backend: str = "auto"
    max_waiting: int = 1024
    tensor_parallel_size: int = 1  # ranks (GPUs, or CPU processes) one model copy is sharded over
    enforce_eager: bool = False
    seed: int = 0
    load_format: str = "auto"  # auto: the checkpoint's weights; dummy: random ones (benchmarks only)
    # Weights (kvmesh.worker.model.quant): auto = the checkpoint's own format; none, fp8, gptq, awq,
    # gguf. The KV cache: auto = the model's dtype; fp8 = float8 e4m3 with per-layer scales.
    quantization: str = "auto"
    kv_cache_dtype: str = "auto"
    # Speculative decoding (worker/engine/speculative): "ngram" (prompt lookup) or a draft model's
    # path in speculative_model; each speculating decode verifies up to k proposals per step.
    speculative: str | None = None  # None | "ngram" | "draft" (implied by speculative_model)
    speculative_model: str | None = None
    num_speculative_tokens: int = 4
    ngram_prompt_lookup_min: int = 2
    ngram_prompt_lookup_max: int = 4
    # Speculation switches itself off for a step once this many sequences are running: a batch
    # that large already keeps the accelerator busy, and verifying k+1 positions per sequence
    # costs more than the accepted tokens save.
    speculative_disable_batch_size: int = 32

    def validate(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.num_blocks is not None and self.num_blocks < 2:
            raise ValueError("num_blocks must be >= 2")
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1")
        if self.decode_token_budget is not None and self.decode_token_budget < 1:
            raise ValueError("decode_token_budget must be >= 1")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError("gpu_memory_utilization must be in (0, 1]")
        if not 1 <= self.tensor_parallel_size <= 64:
            raise ValueError(f"tensor_parallel_size must be in 1..64, got {self.tensor_parallel_size}")
        if self.load_format not in ("auto", "dummy"):
            raise ValueError(f"load_format must be 'auto' or 'dummy', got {self.load_format!r}")
        if self.max_waiting < 1:
            raise ValueError("max_waiting must be >= 1")
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(
                f"quantization must be one of {', '.join(QUANTIZATIONS)}; got {self.quantization!r}"
            )
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(
                f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}; got {self.kv_cache_dtype!r}"
            )
        self._validate_speculative()

    @property
    def speculative_method(self) -> str | None:
        """ "ngram", "draft" or None (off)."""
        if self.speculative_model and self.speculative in (None, "draft"):
            return "draft"
        return self.speculative

    def _validate_speculative(self) -> None:
        if self.speculative not in (None, "ngram", "draft"):
            raise ValueError(f"speculative must be 'ngram' or 'draft', got {self.speculative!r}")
        if self.speculative == "draft" and not self.speculative_model:
            raise ValueError("speculative 'draft' needs speculative_model (the draft model's path)")
        if self.speculative == "ngram" and self.speculative_model:
            raise ValueError("speculative 'ngram' takes no speculative_model")
        if not 1 <= self.num_speculative_tokens <= 16:
            raise ValueError(f"num_speculative_tokens must be in 1..16, got {self.num_speculative_tokens}")
        if not 1 <= self.ngram_prompt_lookup_min <= self.ngram_prompt_lookup_max <= 16:
            raise ValueError(
                "ngram lookup sizes need 1 <= ngram_prompt_lookup_min <= ngram_prompt_lookup_max <= 16, "
                f"got {self.ngram_prompt_lookup_min}..{self.ngram_prompt_lookup_max}"
            )
        if self.speculative_disable_batch_size < 1:
            raise ValueError("speculative_disable_batch_size must be >= 1")

    @classmethod
    def from_kwargs(cls, model: str, **kwargs: Any) -> EngineConfig:
        names = {f.name for f in fields(cls)}
        unknown = set(kwargs) - names
        if unknown:
            raise TypeError(f"unknown engine settings: {sorted(unknown)}")
        return cls(model=model, **kwargs)
