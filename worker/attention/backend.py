"""The attention backend interface and its selection."""

from __future__ import annotations

from typing import Protocol

import torch

from kvmesh.worker.attention.metadata import AttentionMetadata


class AttentionBackend(Protocol):
    name: str

    def write_kv(
        self,
        key: torch.Tensor,
        value: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
        kv_scale: torch.Tensor | None = None,
    ) -> None:
        """Scatter this step's keys/values ``[T, Hkv, D]`` into the paged cache. An fp8 cache
        takes the layer's ``kv_scale`` (float32 ``[k_scale, v_scale]``, see kv_quant.py)."""

    def forward(
        self,
        query: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        kv_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Causal attention of ``query [T, H, D]`` over the paged cache; returns ``[T, H, D]``.

        Called after ``write_kv`` for the same step, so the cache already holds
        this step's keys. GQA: query head h reads KV head ``h // (H // Hkv)``. ``kv_scale``
        as in ``write_kv``.
        """


def get_backend(name: str, device: torch.device, kv_cache_dtype: str = "auto") -> AttentionBackend:
    """``auto`` picks flash_attn, then triton on CUDA, and torch on the CPU; with an fp8 KV cache
    (``kv_cache_dtype``), which flash_attn cannot read, triton on CUDA."""
    if name == "flash_attn" and kv_cache_dtype == "fp8":
        raise ValueError(
            "the flash_attn attention backend cannot read an fp8 KV cache; use --attention-backend "
            "triton (or auto) with --kv-cache-dtype fp8"
        )
    if name == "auto":
        name = "torch"
        if device.type == "cuda" and kv_cache_dtype == "fp8":
            name = "triton"
        elif device.type == "cuda":
            try:
                import flash_attn  # noqa: F401

                name = "flash_attn"
            except ImportError:
                name = "triton"
    if name == "torch":
        from kvmesh.worker.attention.torch_backend import TorchAttentionBackend

        return TorchAttentionBackend()
    if name == "triton":
        from kvmesh.worker.attention.triton_backend import TritonAttentionBackend

        return TritonAttentionBackend()
    if name == "flash_attn":
        from kvmesh.worker.attention.flash_attn_backend import FlashAttnBackend

        return FlashAttnBackend()
    raise ValueError(f"unknown attention backend {name!r} (expected auto, torch, triton or flash_attn)")
