"""The FP8 KV cache (``--kv-cache-dtype fp8``): its dtype, scales and reference conversions.

Keys and values are stored as float8 e4m3 (``torch.float8_e4m3fn``, 1 byte an element: twice the
blocks of a 16-bit pool, four times a float32 one) with one float32 scale per layer for keys and
one for values, as vLLM and compressed-tensors checkpoints define them: stored = fp8(clamp(x /
scale, -448, 448)), read = fp8 * scale. A layer holds its scales as one device tensor
``kv_scale = [k_scale, v_scale]`` made once at load (``Attention.kv_scale``, None for a 16-bit
cache); every backend call takes it, and the Triton kernels read it through a pointer, so a CUDA
graph replays with no host sync and no per-step tensor.

The functions here are the reference conversions (the torch backend, tests); the Triton kernels
(worker/kernels) compute the same bits.
"""

from __future__ import annotations

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # the largest finite e4m3fn value; larger ones saturate rather than become NaN

# Checkpoint names of a layer's scales, ``model.layers.N.<name>``: (key, value) pairs, first match
# wins. llm-compressor/compressed-tensors and AutoFP8 write ``self_attn.k_scale``/``v_scale``;
# NVIDIA ModelOpt hangs them on the projections; older AutoFP8 files have one ``kv_scale`` for both.
SCALE_NAMES = (
    ("self_attn.k_scale", "self_attn.v_scale"),
    ("self_attn.k_proj.k_scale", "self_attn.v_proj.v_scale"),
    ("self_attn.k_proj.output_scale", "self_attn.v_proj.output_scale"),
    ("self_attn.kv_scale", "self_attn.kv_scale"),
)


def is_fp8(cache: torch.Tensor) -> bool:
    return cache.dtype == FP8


def check_kv_scale(k_cache: torch.Tensor, kv_scale: torch.Tensor | None) -> None:
    """An fp8 cache needs its layer's scales; a 16-bit one takes none."""
    if is_fp8(k_cache) != (kv_scale is not None):
        raise ValueError(
            "an fp8 KV cache needs kv_scale (float32 [k_scale, v_scale]); a 16-bit cache takes none"
            if kv_scale is None
            else f"kv_scale given for a {k_cache.dtype} KV cache (scales apply to fp8 only)"
        )


def quantize(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x`` (any float dtype) divided by ``scale``, saturated and rounded to e4m3fn (nearest even)."""
    return (x.float() / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8)


def dequantize(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The values an fp8 tensor stands for, in ``dtype`` (the multiply happens in float32)."""
    return (x.float() * scale).to(dtype)


def scales_from_checkpoint(state, num_layers: int) -> tuple[torch.Tensor, str]:
    """float32 ``[num_layers, 2]`` (k_scale, v_scale per layer) from a checkpoint's tensors, 1.0
    where it has none; and where they came from, for the log. A per-head scale (some exporters)
    becomes its largest head's: a larger scale never overflows, it only coarsens the grid."""
    scales = torch.ones(num_layers, 2, dtype=torch.float32)
    found = 0
    for i in range(num_layers):
        for k_name, v_name in SCALE_NAMES:
            k_full, v_full = f"model.layers.{i}.{k_name}", f"model.layers.{i}.{v_name}"
            if k_full in state and v_full in state:
                for j, name in enumerate((k_full, v_full)):
                    value = float(torch.as_tensor(state[name]).float().max())
                    if not value > 0.0 or value == float("inf"):
                        raise ValueError(f"checkpoint KV scale {name} is {value}; expected a positive number")
                    scales[i, j] = value
                found += 1
                break
    if found == 0:
        return scales, "1.0 (the checkpoint has none)"
    if found < num_layers:
        return scales, f"the checkpoint for {found} of {num_layers} layers, 1.0 for the rest"
    return scales, "the checkpoint"
