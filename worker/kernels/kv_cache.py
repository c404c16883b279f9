"""Fused KV-cache write: one program per new token scatters its keys and values
into the paged cache in a single launch (slot -1 means "do not write").

An fp8 cache (worker/attention/kv_quant.py) stores ``x / scale`` saturated to +-448 and rounded
to e4m3fn. The kernel builds the e4m3 byte itself in exact integer and float arithmetic rather
than casting: Triton's interpreter misrounds float32 -> fp8 (a carry into the exponent is lost,
subnormals are off by one), and the explicit encoding gives the same bits as torch compiled or
interpreted. The division runs in float64 so its float32 result is correctly rounded, as torch's.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvmesh.worker.attention.kv_quant import check_kv_scale


@triton.jit
def _e4m3_bits(x):
    """float32 -> the e4m3fn byte of ``x`` saturated to +-448, rounded to nearest even."""
    sign = (x.to(tl.int32, bitcast=True) >> 24) & 0x80
    a = tl.minimum(tl.abs(x), 448.0)
    bits = a.to(tl.int32, bitcast=True)
    # Normal range (>= 2**-6): round the float32 mantissa to 3 bits; a carry moves into the exponent.
    r = (bits + 0x7FFFF + ((bits >> 20) & 1)) & -0x100000
    normal = (((r >> 23) - 120) << 3) | ((r >> 20) & 7)
    # Subnormals are multiples of 2**-9: the byte is round(a * 512) (8 is the smallest normal).
    m = a * 512.0
    whole = m.to(tl.int32)
    frac = m - whole.to(tl.float32)
    up = (frac > 0.5) | ((frac == 0.5) & ((whole & 1) == 1))
    sub = whole + up.to(tl.int32)
    return (tl.where(a >= 0.015625, normal, sub) | sign).to(tl.uint8)


@triton.jit
def _write_kv_kernel(
    key_ptr,
    value_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_mapping_ptr,
    kv_scale_ptr,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_kcb,
    stride_kct,
    stride_kch,
    stride_vcb,
    stride_vct,
    stride_vch,
    BLOCK_SIZE: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    FP8: tl.constexpr,
):
    t = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + t).to(tl.int64)
    if slot < 0:
        return
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_h[:, None] < NUM_KV_HEADS) & (offs_d[None, :] < HEAD_DIM)
    t64 = t.to(tl.int64)
    k = tl.load(key_ptr + t64 * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :], mask=mask)
    v = tl.load(value_ptr + t64 * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :], mask=mask)
    k_dst = k_cache_ptr + block * stride_kcb + offset * stride_kct + offs_h[:, None] * stride_kch
    v_dst = v_cache_ptr + block * stride_vcb + offset * stride_vct + offs_h[:, None] * stride_vch
    if FP8:  # the caches arrive as uint8 views
        k_scale = tl.load(kv_scale_ptr).to(tl.float64)
        v_scale = tl.load(kv_scale_ptr + 1).to(tl.float64)
        tl.store(k_dst + offs_d[None, :], _e4m3_bits((k.to(tl.float64) / k_scale).to(tl.float32)), mask=mask)
        tl.store(v_dst + offs_d[None, :], _e4m3_bits((v.to(tl.float64) / v_scale).to(tl.float32)), mask=mask)
    else:
        tl.store(k_dst + offs_d[None, :], k.to(k_cache_ptr.dtype.element_ty), mask=mask)
        tl.store(v_dst + offs_d[None, :], v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def write_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    kv_scale: torch.Tensor | None = None,
) -> None:
    """Scatter ``key``/``value`` ``[T, Hkv, D]`` into caches ``[blocks, block_size, Hkv, D]``.

    ``key``/``value`` may be strided views (e.g. slices of a fused QKV output) as
    long as the head dimension is contiguous. An fp8 cache takes ``kv_scale``, float32
    ``[k_scale, v_scale]`` on the cache's device.
    """
    num_tokens, num_kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    if key.stride(-1) != 1:
        key = key.contiguous()
    if value.stride(-1) != 1:
        value = value.contiguous()
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("KV cache head dimension must be contiguous")
    check_kv_scale(k_cache, kv_scale)
    fp8 = kv_scale is not None
    _write_kv_kernel[(num_tokens,)](
        key,
        value,
        k_cache.view(torch.uint8) if fp8 else k_cache,
        v_cache.view(torch.uint8) if fp8 else v_cache,
        slot_mapping,
        kv_scale if fp8 else slot_mapping,  # unread without fp8
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        BLOCK_SIZE=k_cache.shape[1],
        NUM_KV_HEADS=num_kv_heads,
        HEAD_DIM=head_dim,
        BLOCK_H=triton.next_power_of_2(num_kv_heads),
        BLOCK_D=triton.next_power_of_2(head_dim),
        FP8=fp8,
        num_warps=4,
    )
