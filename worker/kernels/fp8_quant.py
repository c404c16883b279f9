"""Per-token FP8 quantization of activations in one launch (kvmesh.worker.model.quant.fp8).

The same numbers as ``fp8.quantize_rows`` (torch ops, the emulation's quantizer), bit for bit: the
row's largest magnitude divided by 448 (IEEE division), each value divided by that scale (IEEE),
clamped to +-448 and rounded to the nearest E4M3 value, ties to even. The rounding is done in
float32 arithmetic before the cast (so the cast is exact): Triton's interpreter rounds values that
carry into the next binade wrongly (127.4 -> 64), and the GPU's conversion rounds the same way
this does. Eight torch kernels become one: at batch 1 an 8B model quantizes 128 inputs a step.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# The kernel writes these as literals: compiled Triton reads no plain module globals in a kernel.
FP8_MAX = 448.0  # the largest finite E4M3 value
MIN_AMAX = 1e-12  # an all-zero row still gets a finite scale


@triton.jit
def _round_e4m3(y):
    """``y`` (|y| <= 448) rounded to the nearest E4M3 value, in float32: the step of ``y``'s binade
    (2^(e-3), 3 mantissa bits; the subnormals share binade -6's step) found from its exponent bits;
    a multiple of it is rounded to an integer by the 1.5 x 2^23 trick (round to nearest even)."""
    a = tl.abs(y)
    exponent = ((a.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    exponent = tl.maximum(exponent, -6)
    step = ((exponent - 3 + 127) << 23).to(tl.float32, bitcast=True)
    inv_step = ((3 - exponent + 127) << 23).to(tl.float32, bitcast=True)
    units = (a * inv_step + 12582912.0) - 12582912.0
    r = units * step
    return tl.where(y < 0, -r, r)


@triton.jit
def _quantize_rows_kernel(
    x_ptr, q_ptr, scale_ptr, static_ptr, cols, stride_x, stride_q, STATIC: tl.constexpr, BLOCK: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    if STATIC:
        scale = tl.load(static_ptr).to(tl.float32)
    else:
        amax = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, cols, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            v = tl.load(x_row + offs, mask=offs < cols, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(v))
        scale = tl.div_rn(tl.maximum(tl.max(amax, axis=0), 1e-12), 448.0)  # MIN_AMAX, FP8_MAX
    for start in range(0, cols, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        v = tl.load(x_row + offs, mask=offs < cols, other=0.0).to(tl.float32)
        y = tl.minimum(tl.maximum(tl.div_rn(v, scale), -448.0), 448.0)
        tl.store(q_ptr + row * stride_q + offs, _round_e4m3(y).to(q_ptr.dtype.element_ty), mask=offs < cols)
    tl.store(scale_ptr + row, scale)


def quantize_rows(
    x: torch.Tensor, static_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [T, K]`` -> (FP8 ``[T, K]``, float32 scales ``[T, 1]``): per row, or every row with
    ``static_scale`` (one number)."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    rows, cols = x.shape
    q = torch.empty((rows, cols), dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty((rows, 1), dtype=torch.float32, device=x.device)
    if rows:
        block = min(4096, triton.next_power_of_2(cols))
        static = static_scale if static_scale is not None else scale
        _quantize_rows_kernel[(rows,)](
            x, q, scale, static, cols, x.stride(0), q.stride(0),
            STATIC=static_scale is not None, BLOCK=block, num_warps=4 if block <= 1024 else 8,
        )  # fmt: skip
    return q, scale
