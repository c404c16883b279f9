"""``x @ W^T`` with ``W`` held as a GGUF file's raw blocks, dequantized inside the product.

``W`` is ``uint8 [out, bytes_per_row]``: each row is ``in / block_size`` blocks of one GGML type
exactly as the file stores them (kvmesh.worker.model.quant.gguf). Each element's byte and scale
are addressed from its row, block and place in the block, so one helper (``_dequantize``)
dequantizes any tile in float32:

- few tokens (decode, ``M <= DECODE_MAX_TOKENS``): ``_gemv_kernel``, a program per ``BLOCK_N``
  rows; each step dequantizes a ``[rows, blocks, block_size]`` tile (each block's scales loaded
  once), multiplies it by every token's columns and sums (no tensor cores: the weights' bytes are
  the cost);
- more (prefill): ``_gemm_kernel``, tiles through ``tl.dot`` with the weight tile cast to the
  activations' dtype (IEEE float32 for float32 activations).

Both accumulate in float32 and write ``x``'s dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvmesh.worker.model.quant.gguf import BLOCKS

DECODE_MAX_TOKENS = 4


@triton.jit
def _byte(ptr, off, mask):
    return tl.load(ptr + off, mask=mask, other=0).to(tl.int32)


@triton.jit
def _sbyte(ptr, off, mask):
    return tl.load(ptr + off, mask=mask, other=0).to(tl.int8, bitcast=True).to(tl.int32)


@triton.jit
def _half(ptr, off, mask):
    bits = _byte(ptr, off, mask) | (_byte(ptr, off + 1, mask) << 8)
    return bits.to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _dequantize(w_ptr, row_off, blk, j, mask, QTYPE: tl.constexpr):
    """float32 weights of rows at byte offsets ``row_off``, blocks ``blk``, elements ``j`` within
    their block (broadcast together; the scales are loaded at the shape of ``row_off + blk``, so a
    tile shaped ``[rows, blocks, block_size]`` loads each block's scale once). ``mask`` must
    broadcast to that shape too. The arithmetic is gguf.quants' own, in its order. ``QTYPE``: the
    GGML type id (quant/gguf.py's BLOCKS)."""
    if QTYPE == 2:  # Q4_0: f16 d, 16 bytes of nibbles (elements 0-15 low, 16-31 high)
        base = row_off + blk * 18
        q = (_byte(w_ptr, base + 2 + j % 16, mask) >> ((j // 16) * 4)) & 15
        w = _half(w_ptr, base, mask) * (q - 8).to(tl.float32)
    elif QTYPE == 3:  # Q4_1: f16 d, f16 m, nibbles as Q4_0
        base = row_off + blk * 20
        q = (_byte(w_ptr, base + 4 + j % 16, mask) >> ((j // 16) * 4)) & 15
        w = _half(w_ptr, base, mask) * q.to(tl.float32) + _half(w_ptr, base + 2, mask)
    elif QTYPE == 8:  # Q8_0: f16 d, 32 int8
        base = row_off + blk * 34
        w = _sbyte(w_ptr, base + 2 + j, mask).to(tl.float32) * _half(w_ptr, base, mask)
    elif QTYPE == 12:  # Q4_K: f16 d, f16 dmin, 12 bytes of 6-bit scales/mins, 128 bytes of nibbles
        base = row_off + blk * 144
        sub = j // 32  # 8 sub-blocks of 32; 4 groups of 32 bytes, low nibbles then high
        q = (_byte(w_ptr, base + 16 + (j // 64) * 32 + j % 32, mask) >> ((sub % 2) * 4)) & 15
        t = sub % 4
        a = _byte(w_ptr, base + 4 + t, mask)
        b = _byte(w_ptr, base + 8 + t, mask)
        c = _byte(w_ptr, base + 12 + t, mask)
        low = sub < 4
        sc = tl.where(low, a & 63, (c & 15) | ((a >> 6) << 4))
        mn = tl.where(low, b & 63, (c >> 4) | ((b >> 6) << 4))
        d = _half(w_ptr, base, mask) * sc.to(tl.float32)
        dm = _half(w_ptr, base + 2, mask) * mn.to(tl.float32)
        w = d * q.to(tl.float32) - dm
    else:  # Q6_K: 128 bytes low nibbles, 64 bytes of 2-bit highs, 16 int8 scales, f16 d
        tl.static_assert(QTYPE == 14)
        base = row_off + blk * 210
        half = j // 128
        r = j % 128
        low = (_byte(w_ptr, base + half * 64 + r % 64, mask) >> ((r // 64) * 4)) & 15
        high = (_byte(w_ptr, base + 128 + half * 32 + r % 32, mask) >> ((r // 32) * 2)) & 3
        q = (low | (high << 4)) - 32
        d = _half(w_ptr, base + 208, mask) * _sbyte(w_ptr, base + 192 + j // 16, mask).to(tl.float32)
        w = d * q.to(tl.float32)
    return w


@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_om,
    QTYPE: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCKS_K: tl.constexpr,
):  # fmt: skip
    """A program per ``BLOCK_N`` rows; each step dequantizes ``[BLOCK_N, BLOCKS_K, GROUP]``
    (whole blocks of ``GROUP`` elements) and multiplies it by each token's columns."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    row_off = rows.to(tl.int64)[:, None, None] * stride_wn
    tokens = tl.arange(0, BLOCK_M)
    j = tl.arange(0, GROUP)
    num_blocks = K // GROUP
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for b0 in range(0, num_blocks, BLOCKS_K):
        blk = b0 + tl.arange(0, BLOCKS_K)
        blk_ok = blk < num_blocks
        mask = row_ok[:, None, None] & blk_ok[None, :, None]
        w = _dequantize(w_ptr, row_off, blk[None, :, None], j[None, None, :], mask, QTYPE)
        cols = blk[:, None] * GROUP + j[None, :]
        for m in tl.static_range(BLOCK_M):
            x = tl.load(x_ptr + m * stride_xm + cols, mask=blk_ok[:, None] & (m < M), other=0.0)
            part = tl.sum(tl.sum(w * x.to(tl.float32)[None, :, :], axis=2), axis=1)
            acc += tl.where(tokens[:, None] == m, part[None, :], 0.0)
    out = out_ptr + tokens[:, None] * stride_om + rows[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=(tokens < M)[:, None] & row_ok[None, :])


@triton.jit
def _gemm_kernel(
    x_ptr, w_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_om,
    QTYPE: tl.constexpr, GROUP: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    tokens = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    token_ok, row_ok = tokens < M, rows < N
    row_off = rows.to(tl.int64)[None, :] * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < K
        x = tl.load(
            x_ptr + tokens[:, None].to(tl.int64) * stride_xm + cols[None, :],
            mask=token_ok[:, None] & col_ok[None, :],
            other=0.0,
        )
        # The weight tile as [BLOCK_K, BLOCK_N] (columns down): tl.dot's right operand as is.
        mask = col_ok[:, None] & row_ok[None, :]
        w = _dequantize(w_ptr, row_off, (cols // GROUP)[:, None], (cols % GROUP)[:, None], mask, QTYPE)
        acc = tl.dot(x, w.to(x_ptr.dtype.element_ty), acc, input_precision=PRECISION)
    out = out_ptr + tokens[:, None].to(tl.int64) * stride_om + rows[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=token_ok[:, None] & row_ok[None, :])


def gguf_matmul(x: torch.Tensor, qweight: torch.Tensor, qtype: int) -> torch.Tensor:
    """``x @ W^T`` for ``x [M, K]`` (float16, bfloat16 or float32) and ``W`` the GGUF blocks
    ``qweight uint8 [N, K / block_size * block_bytes]`` of type ``qtype``; ``[M, N]`` in ``x``'s
    dtype."""
    if qtype not in BLOCKS:
        raise ValueError(f"no GGUF kernel for block type {qtype}")
    block, nbytes = BLOCKS[qtype]
    M, K = x.shape
    N = qweight.shape[0]
    if qweight.dtype != torch.uint8 or qweight.shape[1] * block != K * nbytes:
        raise ValueError(f"GGUF blocks {tuple(qweight.shape)} {qweight.dtype} do not hold {K} columns")
    if x.stride(-1) != 1:
        x = x.contiguous()
    qweight = qweight.contiguous()
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0:
        return out
    if M <= DECODE_MAX_TOKENS:
        block_n = 16
        _gemv_kernel[(triton.cdiv(N, block_n),)](
            x, qweight, out, M, N, K, x.stride(0), qweight.stride(0), out.stride(0),
            QTYPE=qtype, GROUP=block, BLOCK_M=triton.next_power_of_2(M), BLOCK_N=block_n,
            BLOCKS_K=max(2, 128 // block),  # 128 columns a step (two K blocks: 512)
        )  # fmt: skip
        return out
    block_m = min(64, max(16, triton.next_power_of_2(M)))
    block_n, block_k = 64, 64
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
    _gemm_kernel[grid](
        x, qweight, out, M, N, K, x.stride(0), qweight.stride(0), out.stride(0),
        QTYPE=qtype, GROUP=block, PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
    )  # fmt: skip
    return out
