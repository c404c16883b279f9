"""Attention through the ``flash-attn`` package (FlashAttention-2), used when it is installed.

UNTESTED IN CI: flash-attn is not installed on any machine kvmesh's CI or GPU
benchmarks ran on; this file follows the flash-attn 2.x Python API
(``flash_attn_varlen_func`` and ``flash_attn_with_kvcache``, both taking a
``block_table`` over a paged cache ``[num_blocks, block_size, Hkv, D]``, the
same layout as kvmesh's). FlashAttention-2 needs the KV block size to be a
multiple of 256 for paged caches; with smaller blocks (kvmesh's default is
16) this backend falls back to the Triton kernels, so picking it
automatically never breaks a configuration. Both calls align the causal mask to the bottom
right when keys outnumber queries, which is kvmesh's cached-prefix semantics. An fp8 KV cache is
refused (get_backend never picks this backend for one; a direct call raises): flash-attn 2 reads
16-bit caches only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from flash_attn import flash_attn_varlen_func, flash_attn_with_kvcache

from kvmesh.worker.attention.metadata import AttentionMetadata
from kvmesh.worker.kernels.attention import paged_attention
from kvmesh.worker.kernels.kv_cache import write_kv

PAGED_BLOCK_MULTIPLE = 256


class FlashAttnBackend:
    name = "flash_attn"

    def __init__(self) -> None:
        # cu_seqlens_k is derived once per step, not once per layer.
        self._cu_seqlens_k: tuple[torch.Tensor, torch.Tensor] | None = None

    def write_kv(
        self,
        key: torch.Tensor,
        value: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
        kv_scale: torch.Tensor | None = None,
    ) -> None:
        _refuse_fp8(k_cache, kv_scale)
        write_kv(key, value, k_cache, v_cache, slot_mapping)

    def forward(
        self,
        query: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        kv_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        _refuse_fp8(k_cache, kv_scale)
        if k_cache.shape[1] % PAGED_BLOCK_MULTIPLE:
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
            )
        if meta.is_decode_only:
            out = flash_attn_with_kvcache(
                query.unsqueeze(1),  # [B, 1, H, D]
                k_cache,
                v_cache,
                cache_seqlens=meta.seq_lens,
                block_table=meta.block_tables,
                softmax_scale=scale,
                causal=True,
            )
            return out.squeeze(1)
        return flash_attn_varlen_func(
            query,
            k_cache,
            v_cache,
            cu_seqlens_q=meta.query_start_loc,
            cu_seqlens_k=self._cumulative_seq_lens(meta.seq_lens),
            max_seqlen_q=meta.max_query_len,
            max_seqlen_k=meta.max_seq_len,
            softmax_scale=scale,
            causal=True,
            block_table=meta.block_tables,
        )

    def _cumulative_seq_lens(self, seq_lens: torch.Tensor) -> torch.Tensor:
        if self._cu_seqlens_k is not None and self._cu_seqlens_k[0] is seq_lens:
            return self._cu_seqlens_k[1]
        cu = F.pad(torch.cumsum(seq_lens, 0, dtype=torch.int32), (1, 0))
        self._cu_seqlens_k = (seq_lens, cu)
        return cu


def _refuse_fp8(k_cache: torch.Tensor, kv_scale: torch.Tensor | None) -> None:
    if kv_scale is not None or k_cache.dtype == torch.float8_e4m3fn:
        raise ValueError("the flash_attn backend cannot read an fp8 KV cache; use the triton backend")
