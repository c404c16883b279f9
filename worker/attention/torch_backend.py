"""Reference attention in plain PyTorch: gathers each sequence's keys from the
paged cache and runs SDPA with a causal mask offset by the cached context."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvmesh.worker.attention.metadata import AttentionMetadata


class TorchAttentionBackend:
    name = "torch"

    def write_kv(self, key, value, k_cache, v_cache, slot_mapping) -> None:
        block_size = k_cache.shape[1]
        flat_k = k_cache.view(-1, *k_cache.shape[2:])
        flat_v = v_cache.view(-1, *v_cache.shape[2:])
        valid = slot_mapping >= 0
        if not bool(valid.all()):
            key, value, slot_mapping = key[valid], value[valid], slot_mapping[valid]
        del block_size
        flat_k.index_copy_(0, slot_mapping, key)
        flat_v.index_copy_(0, slot_mapping, value)

    def forward(self, query, k_cache, v_cache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        qsl = meta.query_start_loc_cpu or meta.query_start_loc.tolist()
        seq_lens = meta.seq_lens_cpu or meta.seq_lens.tolist()
        block_size = k_cache.shape[1]
        num_heads, num_kv_heads = query.shape[1], k_cache.shape[2]
        out = torch.empty_like(query)
        for b, seq_len in enumerate(seq_lens):
            q = query[qsl[b] : qsl[b + 1]]  # [q, H, D]
            q_len = q.shape[0]
            nblocks = (seq_len + block_size - 1) // block_size
            blocks = meta.block_tables[b, :nblocks]
            k = k_cache[blocks].reshape(-1, num_kv_heads, k_cache.shape[3])[:seq_len]
            v = v_cache[blocks].reshape(-1, num_kv_heads, v_cache.shape[3])[:seq_len]
            if num_kv_heads != num_heads:
                rep = num_heads // num_kv_heads
                k = k.repeat_interleave(rep, dim=1)
                v = v.repeat_interleave(rep, dim=1)
            # Row j (position seq_len - q_len + j) sees keys 0 ..= its position.
            pos_q = torch.arange(seq_len - q_len, seq_len, device=q.device)[:, None]
            mask = torch.arange(seq_len, device=q.device)[None, :] <= pos_q
            o = F.scaled_dot_product_attention(
                q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask, scale=scale
            )
            out[qsl[b] : qsl[b + 1]] = o.transpose(0, 1)
        return out
