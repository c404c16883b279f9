"""Rotary position embedding (rotate-half / GPT-NeoX layout, as Llama, Qwen2 and
Mistral use) applied in place to the query and key of one step in one launch."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rope_kernel(
    q_ptr,
    k_ptr,
    positions_ptr,
    cos_sin_ptr,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_cs,
    NUM_Q_HEADS: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + t).to(tl.int64)
    offs = tl.arange(0, BLOCK_HALF)
    d_mask = offs < HALF
    cos = tl.load(cos_sin_ptr + pos * stride_cs + offs, mask=d_mask, other=0.0)[None, :]
    sin = tl.load(cos_sin_ptr + pos * stride_cs + HALF + offs, mask=d_mask, other=0.0)[None, :]

    hq = tl.arange(0, BLOCK_HQ)
    q_mask = (hq[:, None] < NUM_Q_HEADS) & d_mask[None, :]
    q1_ptr = q_ptr + t * stride_qt + hq[:, None] * stride_qh + offs[None, :]
    q1 = tl.load(q1_ptr, mask=q_mask, other=0.0).to(tl.float32)
    q2 = tl.load(q1_ptr + HALF, mask=q_mask, other=0.0).to(tl.float32)
    tl.store(q1_ptr, (q1 * cos - q2 * sin).to(q_ptr.dtype.element_ty), mask=q_mask)
    tl.store(q1_ptr + HALF, (q2 * cos + q1 * sin).to(q_ptr.dtype.element_ty), mask=q_mask)

    hk = tl.arange(0, BLOCK_HK)
    k_mask = (hk[:, None] < NUM_KV_HEADS) & d_mask[None, :]
    k1_ptr = k_ptr + t * stride_kt + hk[:, None] * stride_kh + offs[None, :]
    k1 = tl.load(k1_ptr, mask=k_mask, other=0.0).to(tl.float32)
    k2 = tl.load(k1_ptr + HALF, mask=k_mask, other=0.0).to(tl.float32)
    tl.store(k1_ptr, (k1 * cos - k2 * sin).to(k_ptr.dtype.element_ty), mask=k_mask)
    tl.store(k1_ptr + HALF, (k2 * cos + k1 * sin).to(k_ptr.dtype.element_ty), mask=k_mask)


def cos_sin_cache(inv_freq: torch.Tensor, max_positions: int, scaling: float = 1.0) -> torch.Tensor:
    """``[max_positions, head_dim]`` float32: cos of each frequency, then sin.

    ``scaling`` is Hugging Face's ``attention_scaling`` (1.0 for plain and llama3 RoPE)."""
    t = torch.arange(max_positions, dtype=torch.float32, device=inv_freq.device)
    freqs = torch.outer(t, inv_freq.float())
    return torch.cat([freqs.cos() * scaling, freqs.sin() * scaling], dim=-1).contiguous()


def apply_rotary(
    positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor, cos_sin: torch.Tensor
) -> None:
    """Rotate ``query [T, H, D]`` and ``key [T, Hkv, D]`` in place (strided views are fine)."""
    num_tokens, num_heads, head_dim = query.shape
    num_kv_heads = key.shape[1]
    if query.stride(-1) != 1 or key.stride(-1) != 1:
        raise ValueError("apply_rotary needs a contiguous head dimension")
    if num_tokens == 0:
        return
    half = head_dim // 2
    _rope_kernel[(num_tokens,)](
        query,
        key,
        positions,
        cos_sin,
        query.stride(0),
        query.stride(1),
        key.stride(0),
        key.stride(1),
        cos_sin.stride(0),
        NUM_Q_HEADS=num_heads,
        NUM_KV_HEADS=num_kv_heads,
        HALF=half,
        BLOCK_HQ=triton.next_power_of_2(num_heads),
        BLOCK_HK=triton.next_power_of_2(num_kv_heads),
        BLOCK_HALF=triton.next_power_of_2(half),
        num_warps=4,
    )
