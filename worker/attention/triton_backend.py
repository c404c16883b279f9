"""Attention on the GPU through kvmesh's own Triton kernels (worker/kernels)."""

from __future__ import annotations

import torch

from kvmesh.worker.attention.metadata import AttentionMetadata
from kvmesh.worker.kernels.attention import paged_attention
from kvmesh.worker.kernels.kv_cache import write_kv


class TritonAttentionBackend:
    name = "triton"

    def __init__(self) -> None:
        # CUDA graphs fix the decode split count at capture; None = choose per call.
        self.num_splits: int | None = None

    def write_kv(
        self,
        key: torch.Tensor,
        value: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> None:
        write_kv(key, value, k_cache, v_cache, slot_mapping)

    def forward(
        self,
        query: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        return paged_attention(
            query,
            k_cache,
            v_cache,
            meta.query_start_loc,
            meta.seq_lens,
            meta.block_tables,
            meta.max_query_len,
            meta.max_seq_len,
            scale,
            num_splits=self.num_splits,
        )
