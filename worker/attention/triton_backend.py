"""Attention on the GPU through kvmesh's own Triton kernels (worker/kernels)."""

from __future__ import annotations

import itertools

import torch

from kvmesh.worker.attention.metadata import AttentionMetadata
from kvmesh.worker.kernels.attention import paged_attention
from kvmesh.worker.kernels.kv_cache import write_kv


class TritonAttentionBackend:
    name = "triton"

    def write_kv(
        self,
        key: torch.Tensor,
        value: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
        kv_scale: torch.Tensor | None = None,
    ) -> None:
        write_kv(key, value, k_cache, v_cache, slot_mapping, kv_scale)

    def forward(
        self,
        query: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        kv_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if meta.has_decode is None:  # once per step (the first layer), kept on the step's metadata
            qsl = meta.query_start_loc_cpu
            meta.has_decode = qsl is None or any(b - a == 1 for a, b in itertools.pairwise(qsl))
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
            has_decode=meta.has_decode,
            kv_scale=kv_scale,
        )
