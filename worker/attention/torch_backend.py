"""Reference attention in plain PyTorch (the CPU backend).

Decode-only steps gather every sequence's keys from the paged cache into one
padded batch and run a single SDPA call; steps with prefill chunks run SDPA per
sequence with a causal mask offset by the cached context. An fp8 cache (kv_quant.py) is written
quantized and read back as the gathered keys and values dequantized to the query's dtype, so the
attention math is the 16-bit one over the values the cache stands for.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvmesh.worker.attention import kv_quant
from kvmesh.worker.attention.metadata import AttentionMetadata


class TorchAttentionBackend:
    name = "torch"

    def __init__(self) -> None:
        self._checked: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def write_kv(self, key, value, k_cache, v_cache, slot_mapping, kv_scale=None) -> None:
        kv_quant.check_kv_scale(k_cache, kv_scale)
        if kv_scale is not None:  # index_copy_ has no fp8 kernel on the CPU: copy the bytes
            key = kv_quant.quantize(key, kv_scale[0]).view(torch.uint8)
            value = kv_quant.quantize(value, kv_scale[1]).view(torch.uint8)
            k_cache, v_cache = k_cache.view(torch.uint8), v_cache.view(torch.uint8)
        flat_k = k_cache.view(-1, *k_cache.shape[2:])
        flat_v = v_cache.view(-1, *v_cache.shape[2:])
        if self._checked is None or self._checked[0] is not slot_mapping:  # once per step, not per layer
            valid = slot_mapping >= 0
            self._checked = (slot_mapping, None if bool(valid.all()) else valid)
        valid = self._checked[1]
        if valid is not None:  # padding slots (-1) are skipped
            key, value, slot_mapping = key[valid], value[valid], slot_mapping[valid]
        flat_k.index_copy_(0, slot_mapping, key)
        flat_v.index_copy_(0, slot_mapping, value)

    def forward(
        self, query, k_cache, v_cache, meta: AttentionMetadata, scale: float, kv_scale=None
    ) -> torch.Tensor:
        kv_quant.check_kv_scale(k_cache, kv_scale)
        if meta.max_query_len == 1:
            return self._decode(query, k_cache, v_cache, meta, scale, kv_scale)
        qsl = meta.query_start_loc_cpu or meta.query_start_loc.tolist()
        seq_lens = meta.seq_lens_cpu or meta.seq_lens.tolist()
        block_size, num_kv_heads, head_dim = k_cache.shape[1], k_cache.shape[2], k_cache.shape[3]
        out = torch.empty_like(query)
        for b, seq_len in enumerate(seq_lens):
            q = query[qsl[b] : qsl[b + 1]]  # [q, H, D]
            q_len = q.shape[0]
            # index_select, not k_cache[blocks]: advanced indexing with int32 is far slower on the CPU.
            blocks = meta.block_tables[b, : -(-seq_len // block_size)]
            k = k_cache.index_select(0, blocks).reshape(-1, num_kv_heads, head_dim)[:seq_len]
            v = v_cache.index_select(0, blocks).reshape(-1, num_kv_heads, head_dim)[:seq_len]
            if kv_scale is not None:
                k = kv_quant.dequantize(k, kv_scale[0], query.dtype)
                v = kv_quant.dequantize(v, kv_scale[1], query.dtype)
            # Row j (position seq_len - q_len + j) sees keys 0 ..= its position.
            pos_q = torch.arange(seq_len - q_len, seq_len, device=q.device)[:, None]
            mask = torch.arange(seq_len, device=q.device)[None, :] <= pos_q
            o = F.scaled_dot_product_attention(
                q.transpose(0, 1),
                _expand_kv(k.transpose(0, 1), q.shape[1]),
                _expand_kv(v.transpose(0, 1), q.shape[1]),
                attn_mask=mask,
                scale=scale,
            )
            out[qsl[b] : qsl[b + 1]] = o.transpose(0, 1)
        return out

    def _decode(
        self, query, k_cache, v_cache, meta: AttentionMetadata, scale: float, kv_scale
    ) -> torch.Tensor:
        block_size, num_kv_heads, head_dim = k_cache.shape[1], k_cache.shape[2], k_cache.shape[3]
        batch, num_heads, max_len = query.shape[0], query.shape[1], meta.max_seq_len
        tables = meta.block_tables[:, : -(-max_len // block_size)].reshape(-1)
        k = k_cache.index_select(0, tables).reshape(batch, -1, num_kv_heads, head_dim)[:, :max_len]
        v = v_cache.index_select(0, tables).reshape(batch, -1, num_kv_heads, head_dim)[:, :max_len]
        if kv_scale is not None:
            k = kv_quant.dequantize(k, kv_scale[0], query.dtype)
            v = kv_quant.dequantize(v, kv_scale[1], query.dtype)
        mask = None
        seq_lens = meta.seq_lens_cpu
        if seq_lens is None or min(seq_lens) < max_len:  # sequences of unequal length: mask the padding
            valid = torch.arange(max_len, device=query.device)[None, :] < meta.seq_lens[:, None]
            # Padding slots may hold anything (stale or never-written blocks); a non-finite value
            # there would poison its row despite the mask, so clear them.
            pad = ~valid[:, :, None, None]
            k, v = k.masked_fill(pad, 0.0), v.masked_fill(pad, 0.0)
            mask = valid[:, None, None, :]
        # A decode query has no causal structure, so the heads that share a KV head attend as rows
        # of one query against it: grouped-query attention without copying keys per head.
        group = num_heads // num_kv_heads
        # On one intra-op thread: a decode's attention is a few small (batch x KV head) items, and
        # the CPU SDPA kernel run on several threads spends far longer waking and waiting for them
        # (on the 2-core machine, 2 threads: 4.7 ms a call against 0.14 ms on one, same bits; each
        # item is computed whole by one thread either way).
        threads = torch.get_num_threads()
        if threads > 1:
            torch.set_num_threads(1)
        try:
            o = F.scaled_dot_product_attention(
                query.reshape(batch, num_kv_heads, group, head_dim),
                k.transpose(1, 2),
                v.transpose(1, 2),
                attn_mask=mask,
                scale=scale,
            )  # [B, Hkv, G, D]
        finally:
            if threads > 1:
                torch.set_num_threads(threads)
        return o.reshape(batch, num_heads, head_dim)


def _expand_kv(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """``[..., Hkv, L, D]`` -> ``[..., H, L, D]`` for grouped-query attention. SDPA's own
    ``enable_gqa`` is an order of magnitude slower on the CPU at these sizes."""
    kv_heads = x.shape[-3]
    if kv_heads == num_heads:
        return x
    return x.repeat_interleave(num_heads // kv_heads, dim=-3)
