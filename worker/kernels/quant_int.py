"""Fused dequantize-GEMM for 4- and 8-bit weight-only layers (GPTQ and AWQ, repacked at load).

``out[m, n] = sum_k x[m, perm[k]] * (q[k, n] - zero[g(k), n]) * scale[g(k), n]`` with the weight
in the layout kvmesh.worker.model.quant.intweight builds: int32 words ``[K / pack, N]`` packed
along K, float16 scales and uint8 (int16) zeros ``[groups, N]``, an optional input permutation
(act-order) and optional per-row groups. Each tile unpacks its words in registers, scales them in
float32, rounds to the activation's dtype and multiplies with float32 accumulation; the dense
weight never exists in memory.

Two launch shapes:

- decode (up to ``DECODE_MAX_TOKENS`` tokens): the weight read is the whole cost, so the grid must
  cover the GPU with few output tiles: K is split across programs (split-K), each adding its
  partial sums into a float32 buffer with atomics;
- prefill: ordinary output tiles, large enough to reuse each unpacked weight tile across many
  tokens, grouped along M for L2 reuse, stored in the activation's dtype.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

DECODE_MAX_TOKENS = 16


@dataclass(frozen=True, slots=True)
class LaunchConfig:
    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3
    words_once: bool = False  # load each word once and repeat it in registers (else once per row)


@triton.jit
def _int_matmul_kernel(
    x_ptr,
    qw_ptr,
    scales_ptr,
    zeros_ptr,
    perm_ptr,
    groups_ptr,
    bias_ptr,
    out_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_om,
    group_size,
    k_iters,
    BITS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    SCALE_PER_TILE: tl.constexpr,
    HAS_PERM: tl.constexpr,
    HAS_GROUPS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ATOMIC: tl.constexpr,
    PRECISION: tl.constexpr,
    WORDS_ONCE: tl.constexpr,
):
    PACK: tl.constexpr = 32 // BITS
    MAXQ: tl.constexpr = (1 << BITS) - 1
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n  # consecutive programs share a band of GROUP_M row tiles
    first_m = (pid // per_group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % size_m
    pid_n = (pid % per_group) // size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_first = pid_k * k_iters * BLOCK_K
    for i in range(0, k_iters):
        k0 = k_first + i * BLOCK_K
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        if HAS_PERM:
            cols = tl.load(perm_ptr + offs_k, mask=mask_k, other=0)
        else:
            cols = offs_k
        a = tl.load(x_rows + cols[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        mask_kn = mask_k[:, None] & mask_n[None, :]
        # Each word holds PACK consecutive rows; each row shifts out its own bits.
        if WORDS_ONCE:  # BLOCK_K / PACK rows of words, repeated PACK times in registers
            offs_w = k0 // PACK + tl.arange(0, BLOCK_K // PACK)
            mask_w = (offs_w < K // PACK)[:, None] & mask_n[None, :]
            words = tl.load(qw_ptr + offs_w[:, None] * N + offs_n[None, :], mask=mask_w, other=0)
            words = tl.broadcast_to(words[:, None, :], (BLOCK_K // PACK, PACK, BLOCK_N))
            words = tl.reshape(words, (BLOCK_K, BLOCK_N))
        else:  # every row loads its word (the repeats come from L1)
            words = tl.load(qw_ptr + (offs_k // PACK)[:, None] * N + offs_n[None, :], mask=mask_kn, other=0)
        q = (words >> ((offs_k % PACK) * BITS)[:, None]) & MAXQ
        if SCALE_PER_TILE:  # the whole tile is in one group: one row of scales and zeros
            g = k0 // group_size
            mask_g = mask_n & (k0 < K)
            s = tl.load(scales_ptr + g * N + offs_n, mask=mask_g, other=0.0).to(tl.float32)
            z = tl.load(zeros_ptr + g * N + offs_n, mask=mask_g, other=0).to(tl.int32)
            w = (q - z[None, :]).to(tl.float32) * s[None, :]
        else:
            if HAS_GROUPS:
                g = tl.load(groups_ptr + offs_k, mask=mask_k, other=0)
            else:
                g = offs_k // group_size
            at = g[:, None] * N + offs_n[None, :]
            s = tl.load(scales_ptr + at, mask=mask_kn, other=0.0).to(tl.float32)
            z = tl.load(zeros_ptr + at, mask=mask_kn, other=0).to(tl.int32)
            w = (q - z).to(tl.float32) * s
        acc += tl.dot(a, w.to(a.dtype), input_precision=PRECISION)
    if HAS_BIAS:
        b = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        if ATOMIC:
            b = b * (pid_k == 0).to(tl.float32)  # one split adds the bias
        acc += b[None, :]
    out = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    if ATOMIC:
        tl.atomic_add(out, acc, mask=mask, sem="relaxed")
    else:
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)


@functools.lru_cache(maxsize=8)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _fit(block: int, size: int) -> int:
    """``block``, or less for a small dimension (at least 16, the smallest tl.dot)."""
    return max(16, min(block, triton.next_power_of_2(size)))


def choose_config(m: int, n: int, k: int, device: torch.device) -> LaunchConfig:
    if m <= DECODE_MAX_TOKENS:
        block_n, block_k = _fit(64, n), _fit(128, k)
        tiles = triton.cdiv(n, block_n)
        sms = _num_sms(device.index or 0) if device.type == "cuda" else 4
        k_tiles = triton.cdiv(k, block_k)
        split = max(1, min(triton.cdiv(4 * sms, tiles), k_tiles // 2 or 1))
        return LaunchConfig(16, block_n, block_k, split, num_warps=4, num_stages=4)
    block_m = _fit(64 if m <= 64 else 128, m)
    return LaunchConfig(block_m, _fit(128, n), _fit(64, k), 1, num_warps=8 if block_m == 128 else 4)


def int_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    *,
    bits: int,
    group_size: int,
    perm: torch.Tensor | None = None,
    group_idx: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    config: LaunchConfig | None = None,
) -> torch.Tensor:
    """``x [T, K]`` times the quantized ``[K, N]`` weight (+ ``bias``) -> ``[T, N]`` in ``x``'s dtype.
    ``group_size``: rows per group when ``group_idx`` is None (K for one group)."""
    m, k = x.shape
    n = qweight.shape[1]
    if qweight.shape[0] * (32 // bits) != k:
        raise ValueError(f"packed weight {tuple(qweight.shape)} does not match {k} input features")
    if x.stride(-1) != 1:
        x = x.contiguous()
    cfg = config or choose_config(m, n, k, x.device)
    k_tiles = triton.cdiv(k, cfg.block_k)
    k_iters = triton.cdiv(k_tiles, cfg.split_k)
    split = triton.cdiv(k_tiles, k_iters)  # no empty splits
    atomic = split > 1
    out = torch.zeros((m, n), dtype=torch.float32, device=x.device) if atomic else x.new_empty((m, n))
    if m == 0:
        return out.to(x.dtype)
    per_tile = group_idx is None and (group_size % cfg.block_k == 0 or group_size >= k)
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n), split)
    _int_matmul_kernel[grid](
        x,
        qweight,
        scales,
        zeros,
        perm if perm is not None else qweight,
        group_idx if group_idx is not None else qweight,
        bias if bias is not None else scales,
        out,
        m,
        n,
        k,
        x.stride(0),
        out.stride(0),
        group_size,
        k_iters,
        BITS=bits,
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        GROUP_M=8,
        SCALE_PER_TILE=per_tile,
        HAS_PERM=perm is not None,
        HAS_GROUPS=group_idx is not None,
        HAS_BIAS=bias is not None,
        ATOMIC=atomic,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32",  # float32 activations: no TF32 rounding
        WORDS_ONCE=cfg.words_once,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return out.to(x.dtype) if atomic else out
