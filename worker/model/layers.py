"""Building blocks of the Llama-family forward pass, written to match
transformers' numerics (float32 RMSNorm statistics, rotate-half RoPE)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps
        self.fused = False  # the Triton kernel (use_fused_kernels); else plain torch ops

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """``norm(x)``; with ``residual``, ``(norm(x + residual), x + residual)``.

        The residual form lets a decoder carry its stream through the norms, so on
        the GPU the add is fused into the norm's kernel (updating ``residual`` in place).
        """
        if self.fused:  # one fused Triton kernel, same rounding
            from kvmesh.worker.kernels.norm import rms_norm

            if residual is None:
                return rms_norm(x, self.weight, self.eps)
            return rms_norm(x, self.weight, self.eps, residual=residual), residual
        if residual is None:
            return self._norm(x)
        x = residual + x
        return self._norm(x), x

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


class SiluAndMul(nn.Module):
    """Input ``[..., 2 * I]`` holding gate then up projections."""

    def __init__(self) -> None:
        super().__init__()
        self.fused = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            from kvmesh.worker.kernels.activation import silu_and_mul

            return silu_and_mul(x)
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up


def rope_inv_freq(config, head_dim: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and attention scaling for the config's RoPE variant."""
    params = getattr(config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        return inv, 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(f"unsupported rope_type {rope_type!r}")
    inv, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, torch.device("cpu"))
    return inv.float(), float(scaling)


class RotaryEmbedding(nn.Module):
    """Precomputed cos/sin tables indexed by position."""

    def __init__(self, config, head_dim: int, max_positions: int) -> None:
        super().__init__()
        inv_freq, scaling = rope_inv_freq(config, head_dim)
        t = torch.arange(max_positions, dtype=torch.float32)
        freqs = t[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        # Plain attributes, not buffers: the tables stay float32 when the model is cast.
        self.cos = emb.cos() * scaling
        self.sin = emb.sin() * scaling
        half = head_dim // 2
        self.cos_sin = torch.cat((self.cos[:, :half], self.sin[:, :half]), dim=-1)  # the GPU kernel's table
        self.fused = False

    def rows(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The step's cos and sin rows for the unfused path (gathered once per step, kept on the
        step's attention metadata); None when the fused kernel reads the table itself."""
        if self.fused:
            return None
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)

    def forward(self, positions: torch.Tensor, qk: torch.Tensor, num_q_heads: int, rows=None):
        """``qk [T, H + Hkv, D]``: the queries' heads, then the keys'. Returns the rotated
        ``q [T, H, D]`` and ``k [T, Hkv, D]`` in their dtype. ``rows`` is ``rows(positions)``."""
        if self.fused:  # in place, one Triton launch for q and k
            from kvmesh.worker.kernels.rotary import apply_rotary

            q, k = qk.split([num_q_heads, qk.shape[1] - num_q_heads], dim=1)
            apply_rotary(positions, q, k, self.cos_sin)
            return q, k
        cos, sin = rows if rows is not None else self.rows(positions)
        x = qk.float()  # elementwise, so rotating q and k together rounds exactly as one by one
        out = (x * cos + _rotate_half(x) * sin).to(qk.dtype)
        return out.split([num_q_heads, qk.shape[1] - num_q_heads], dim=1)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def store_linear_weights_transposed_(model: nn.Module) -> None:
    """Gives every linear layer's weight of ``model`` a transposed memory layout: the same
    ``[out, in]`` tensor (so every caller of ``F.linear`` works unchanged) with strides
    ``(1, out)``. Called before the weights are loaded: the contents become undefined.

    On the CPU a float32 matrix-vector product (one decode token) against the ``[in, out]``
    row-major operand this gives the BLAS costs about a quarter less CPU than against ``[out, in]``
    for the same bytes of weight (``bench/cpu_decode.py --layouts 1``: SmolLM2-135M's shapes); its
    sums accumulate in another order (last-bit differences). Products of several rows take the same
    path either way (bit-identical) at about the same speed. A tied LM head shares the embedding's
    tensor, whose row lookups then read strided memory (one row per token)."""
    seen: set[int] = set()
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if not isinstance(module, nn.Linear) or weight is None or id(weight) in seen:
            continue
        seen.add(id(weight))
        out_features, in_features = weight.shape
        weight.data = torch.empty_strided(
            (out_features, in_features), (1, out_features), dtype=weight.dtype, device=weight.device
        )


def use_fused_kernels(model: nn.Module, fused: bool) -> None:
    """Chooses, for every norm, activation and rotary module of ``model``, between the Triton
    kernels (a GPU with a Triton-family attention backend) and plain torch ops (the CPU, or
    ``--attention-backend torch`` on a GPU: the reference path runs no Triton at all)."""
    for module in model.modules():
        if isinstance(module, (RMSNorm, SiluAndMul, RotaryEmbedding)):
            module.fused = fused
