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
    ) -> None:
        """Scatter this step's keys/values ``[T, Hkv, D]`` into the paged cache."""

    def forward(
        self,
        query: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        """Causal attention of ``query [T, H, D]`` over the paged cache; returns ``[T, H, D]``.

        Called after ``write_kv`` for the same step, so the cache already holds
        this step's keys. GQA: query head h reads KV head ``h // (H // Hkv)``.
        """


def get_backend(name: str, device: torch.device) -> AttentionBackend:
    """``auto`` picks flash_attn, then triton on CUDA, and torch on the CPU."""
    if name == "auto":
        name = "torch"
        if device.type == "cuda":
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
