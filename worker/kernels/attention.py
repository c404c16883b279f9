"""Paged attention in Triton, FlashAttention-style (online softmax over KV tiles).

Two kernels share one flat batch (see ``AttentionMetadata``):

- ``_prefill_kernel``: one program per (query tile, sequence, query head). The
  query rows of a sequence sit at positions ``seq_len - q_len ..`` so a cached
  prefix is just the keys before them. Key tiles left of the tile's first
  query position need no causal mask and run through an unmasked loop; only
  the tiles on the diagonal pay for the mask.
- ``_decode_kernel``: one program per (sequence, KV head, KV split) for
  sequences with one new token. The query heads of a GQA group are packed as
  the rows of one tile, so each key/value is read once per group. Long
  contexts are split over several programs (split-KV); ``_reduce_kernel``
  merges the partial results by their log-sum-exp.

In a mixed step both kernels run on the whole batch and each skips the
sequences that belong to the other, so no host-side regrouping is needed and
the decode path stays capturable in a CUDA graph (the grid depends only on
the batch size and a fixed split count).

An fp8 cache (worker/attention/kv_quant.py) is read by the same kernels: each key/value tile is
cast to the query's dtype (exact: e4m3 fits in bf16, fp16 and float32), the layer's key scale
folds into the softmax scale and its value scale into the output, both loaded once per program
from the ``kv_scale`` tensor.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from kvmesh.worker.attention.kv_quant import check_kv_scale

_LOG2E = 1.4426950408889634
MAX_SPLITS = 32
# Tile shapes on the GPU (bench/gpu_kernels.py sweeps them); the interpreter uses small tiles.
PREFILL_CONFIG = {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2}
DECODE_CONFIG = {"BLOCK_N": 64, "num_warps": 4, "num_stages": 2}


@triton.jit
def _prefill_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    o_ptr,
    query_start_loc_ptr,
    seq_lens_ptr,
    block_tables_ptr,
    kv_scale_ptr,
    scale_log2,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_bt,
    BLOCK_SIZE: tl.constexpr,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SKIP_DECODE: tl.constexpr,
    PRECISION: tl.constexpr,
    KV_SCALED: tl.constexpr,
):
    m_block = tl.program_id(0)
    seq = tl.program_id(1)
    head = tl.program_id(2)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    if m_block * BLOCK_M >= q_len:
        return
    if SKIP_DECODE and q_len == 1:
        return  # the decode kernel owns single-token sequences
    seq_len = tl.load(seq_lens_ptr + seq)
    ctx_len = seq_len - q_len
    kv_head = head // GROUP

    offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    m_mask = offs_m < q_len
    q_rows = (q_start + offs_m).to(tl.int64)
    q = tl.load(
        q_ptr + q_rows[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
        mask=m_mask[:, None] & d_mask[None, :],
        other=0.0,
    )
    pos = ctx_len + offs_m  # absolute position of each query row
    if KV_SCALED:  # fp8 keys: q . (k * k_scale) = (q . k) * k_scale
        scale_log2 = scale_log2 * tl.load(kv_scale_ptr)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    bt_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
    k_base = k_cache_ptr + kv_head * stride_kh + offs_d[None, :]
    v_base = v_cache_ptr + kv_head * stride_vh + offs_d[None, :]

    # Keys before the tile's first query position are visible to every row.
    first_pos = ctx_len + m_block * BLOCK_M
    unmasked_end = (first_pos // BLOCK_N) * BLOCK_N
    kv_end = tl.minimum(seq_len, first_pos + BLOCK_M)
    for start in range(0, unmasked_end, BLOCK_N):
        n = start + offs_n
        block = tl.load(bt_row + n // BLOCK_SIZE).to(tl.int64)
        slot_k = block * stride_kb + (n % BLOCK_SIZE) * stride_kt
        slot_v = block * stride_vb + (n % BLOCK_SIZE) * stride_vt
        k = tl.load(k_base + slot_k[:, None], mask=d_mask[None, :], other=0.0).to(q.dtype)
        v = tl.load(v_base + slot_v[:, None], mask=d_mask[None, :], other=0.0).to(q.dtype)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    for start in range(unmasked_end, kv_end, BLOCK_N):
        n = start + offs_n
        n_mask = n < kv_end
        block = tl.load(bt_row + n // BLOCK_SIZE, mask=n_mask, other=0).to(tl.int64)
        slot_k = block * stride_kb + (n % BLOCK_SIZE) * stride_kt
        slot_v = block * stride_vb + (n % BLOCK_SIZE) * stride_vt
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(k_base + slot_k[:, None], mask=kv_mask, other=0.0).to(q.dtype)
        v = tl.load(v_base + slot_v[:, None], mask=kv_mask, other=0.0).to(q.dtype)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
        visible = (n[None, :] <= pos[:, None]) & n_mask[None, :]
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    out = acc / l_i[:, None]
    if KV_SCALED:
        out = out * tl.load(kv_scale_ptr + 1)
    tl.store(
        o_ptr + q_rows[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
        out.to(o_ptr.dtype.element_ty),
        mask=m_mask[:, None] & d_mask[None, :],
    )


@triton.jit
def _decode_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    o_ptr,
    part_o_ptr,
    part_lse_ptr,
    query_start_loc_ptr,
    seq_lens_ptr,
    block_tables_ptr,
    kv_scale_ptr,
    scale_log2,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_bt,
    NUM_HEADS: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_G: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
    KV_SCALED: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    num_splits = tl.num_programs(2)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    if q_len != 1:
        return  # a prefill chunk: the prefill kernel owns it
    seq_len = tl.load(seq_lens_ptr + seq)
    tiles_per_split = tl.cdiv(tl.cdiv(seq_len, BLOCK_N), num_splits)
    start = split * tiles_per_split * BLOCK_N
    end = tl.minimum(seq_len, start + tiles_per_split * BLOCK_N)

    offs_g = tl.arange(0, BLOCK_G)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    g_mask = offs_g < GROUP
    d_mask = offs_d < HEAD_DIM
    heads = kv_head * GROUP + offs_g
    q_row = q_start.to(tl.int64)
    q = tl.load(
        q_ptr + q_row * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
        mask=g_mask[:, None] & d_mask[None, :],
        other=0.0,
    )

    if KV_SCALED:
        scale_log2 = scale_log2 * tl.load(kv_scale_ptr)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    bt_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
    k_base = k_cache_ptr + kv_head * stride_kh + offs_d[None, :]
    v_base = v_cache_ptr + kv_head * stride_vh + offs_d[None, :]
    for tile in range(start, end, BLOCK_N):
        n = tile + offs_n
        n_mask = n < end
        block = tl.load(bt_row + n // BLOCK_SIZE, mask=n_mask, other=0).to(tl.int64)
        slot_k = block * stride_kb + (n % BLOCK_SIZE) * stride_kt
        slot_v = block * stride_vb + (n % BLOCK_SIZE) * stride_vt
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(k_base + slot_k[:, None], mask=kv_mask, other=0.0).to(q.dtype)
        v = tl.load(v_base + slot_v[:, None], mask=kv_mask, other=0.0).to(q.dtype)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
        s = tl.where(n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    # An empty split (short sequence) leaves l_i == 0: weight -inf, output 0.
    out = acc / tl.maximum(l_i, 1e-30)[:, None]
    if KV_SCALED:  # before the split merge, which is linear in the parts
        out = out * tl.load(kv_scale_ptr + 1)
    if num_splits == 1:
        tl.store(
            o_ptr + q_row * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
            out.to(o_ptr.dtype.element_ty),
            mask=g_mask[:, None] & d_mask[None, :],
        )
    else:
        lse = tl.where(l_i > 0, m_i + tl.log2(tl.maximum(l_i, 1e-30)), float("-inf"))
        row = (seq.to(tl.int64) * NUM_HEADS + heads) * num_splits + split
        tl.store(
            part_o_ptr + row[:, None] * HEAD_DIM + offs_d[None, :],
            out,
            mask=g_mask[:, None] & d_mask[None, :],
        )
        tl.store(part_lse_ptr + row, lse, mask=g_mask)


@triton.jit
def _reduce_kernel(
    part_o_ptr,
    part_lse_ptr,
    o_ptr,
    query_start_loc_ptr,
    stride_ot,
    stride_oh,
    num_splits,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    if q_len != 1:
        return
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_mask = offs_s < num_splits
    rows = (seq.to(tl.int64) * NUM_HEADS + head) * num_splits + offs_s
    lse = tl.load(part_lse_ptr + rows, mask=s_mask, other=float("-inf"))
    weights = tl.exp2(lse - tl.max(lse, 0))
    parts = tl.load(
        part_o_ptr + rows[:, None] * HEAD_DIM + offs_d[None, :],
        mask=s_mask[:, None] & (offs_d[None, :] < HEAD_DIM),
        other=0.0,
    )
    out = tl.sum(parts * weights[:, None], 0) / tl.sum(weights, 0)
    tl.store(
        o_ptr + q_start.to(tl.int64) * stride_ot + head * stride_oh + offs_d,
        out.to(o_ptr.dtype.element_ty),
        mask=offs_d < HEAD_DIM,
    )


@functools.lru_cache(maxsize=8)
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def _interpreting() -> bool:
    return not isinstance(_prefill_kernel, triton.runtime.JITFunction)


def num_kv_splits(num_seqs: int, num_kv_heads: int, max_seq_len: int, device: torch.device) -> int:
    """Split the context when the batch alone cannot fill the GPU: aim at about
    two programs per SM, with at least two key tiles per split."""
    tiles = triton.cdiv(max(max_seq_len, 1), _decode_block_n())
    want = triton.cdiv(2 * _num_sms(device), max(num_seqs * num_kv_heads, 1))
    return max(1, min(want, triton.cdiv(tiles, 2), MAX_SPLITS))


def _decode_block_n() -> int:
    return 16 if _interpreting() else DECODE_CONFIG["BLOCK_N"]


def paged_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    max_query_len: int,
    max_seq_len: int,
    scale: float,
    out: torch.Tensor | None = None,
    num_splits: int | None = None,
    has_decode: bool = True,
    kv_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of ``query [T, H, D]`` over the paged cache; see ``AttentionMetadata``.

    ``num_splits`` fixes the decode split count; by default it follows the batch
    size and ``max_seq_len`` (a CUDA graph captures it with the rest).
    ``has_decode=False`` (no single-token sequence in a step with prefills)
    skips the decode launch; the result is the same either way. An fp8 cache takes
    ``kv_scale``, float32 ``[k_scale, v_scale]`` on the cache's device.
    """
    num_tokens, num_heads, head_dim = query.shape
    num_seqs = seq_lens.shape[0]
    num_kv_heads = k_cache.shape[2]
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads is not a multiple of {num_kv_heads} KV heads")
    check_kv_scale(k_cache, kv_scale)
    kv_scaled = kv_scale is not None
    if query.stride(-1) != 1:
        query = query.contiguous()
    if out is None:
        out = torch.empty_like(query)
    if num_tokens == 0 or num_seqs == 0:
        return out
    group = num_heads // num_kv_heads
    block_d = triton.next_power_of_2(head_dim)
    scale_log2 = scale * _LOG2E
    # float32 caches get full-precision dots (exact-match checks); bf16/fp16 ignore this.
    precision = "ieee" if query.dtype == torch.float32 else "tf32"
    interp = _interpreting()
    common = (
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        block_tables.stride(0),
    )

    if max_query_len > 1:
        cfg = PREFILL_CONFIG
        block_m, block_n = (16, 16) if interp else (cfg["BLOCK_M"], cfg["BLOCK_N"])
        if not interp and head_dim > 128:
            block_m = min(block_m, 64)
        grid = (triton.cdiv(max_query_len, block_m), num_seqs, num_heads)
        _prefill_kernel[grid](
            query,
            k_cache,
            v_cache,
            out,
            query_start_loc,
            seq_lens,
            block_tables,
            kv_scale if kv_scaled else seq_lens,  # unread without scales
            scale_log2,
            query.stride(0),
            query.stride(1),
            out.stride(0),
            out.stride(1),
            *common,
            BLOCK_SIZE=k_cache.shape[1],
            GROUP=group,
            HEAD_DIM=head_dim,
            BLOCK_D=block_d,
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            SKIP_DECODE=True,
            PRECISION=precision,
            KV_SCALED=kv_scaled,
            num_warps=cfg["num_warps"],
            num_stages=cfg["num_stages"],
        )

    if max_query_len > 1 and not has_decode:
        return out
    if num_splits is None:
        num_splits = num_kv_splits(num_seqs, num_kv_heads, max_seq_len, query.device)
    if num_splits == 1:  # the kernel writes ``out`` directly; one dtype keeps one compiled variant
        part_o = part_lse = torch.empty(1, dtype=torch.float32, device=query.device)
    else:
        part_o = torch.empty(
            (num_seqs, num_heads, num_splits, head_dim), dtype=torch.float32, device=query.device
        )
        part_lse = torch.empty((num_seqs, num_heads, num_splits), dtype=torch.float32, device=query.device)
    _decode_kernel[(num_seqs, num_kv_heads, num_splits)](
        query,
        k_cache,
        v_cache,
        out,
        part_o,
        part_lse,
        query_start_loc,
        seq_lens,
        block_tables,
        kv_scale if kv_scaled else seq_lens,
        scale_log2,
        query.stride(0),
        query.stride(1),
        out.stride(0),
        out.stride(1),
        *common,
        NUM_HEADS=num_heads,
        BLOCK_SIZE=k_cache.shape[1],
        GROUP=group,
        BLOCK_G=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        BLOCK_N=_decode_block_n(),
        PRECISION=precision,
        KV_SCALED=kv_scaled,
        num_warps=DECODE_CONFIG["num_warps"],
        num_stages=DECODE_CONFIG["num_stages"],
    )
    if num_splits > 1:
        _reduce_kernel[(num_seqs, num_heads)](
            part_o,
            part_lse,
            out,
            query_start_loc,
            out.stride(0),
            out.stride(1),
            num_splits,
            NUM_HEADS=num_heads,
            HEAD_DIM=head_dim,
            BLOCK_D=block_d,
            BLOCK_S=MAX_SPLITS,
            num_warps=4,
        )
    return out


__all__ = ["MAX_SPLITS", "num_kv_splits", "paged_attention"]
