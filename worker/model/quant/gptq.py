"""GPTQ checkpoints, as AutoGPTQ and GPTQModel write them (``quant_method: gptq``).

Per linear layer: ``qweight`` int32 ``[in * bits / 32, out]`` (packed along the input),
``qzeros`` int32 ``[groups, out * bits / 32]`` (packed along the output; format v1, ``gptq``,
stores ``zero - 1``, ``gptq_v2`` the zero), ``scales`` float16 ``[groups, out]``, ``g_idx`` int32
``[in]`` (each input feature's group; a permutation of them under ``desc_act``), ``bias`` when
the model has one. ``groups = ceil(in / group_size)``; ``group_size: -1`` is one group. 4 and 8
bits are served; intweight.py says how the kernel's layout is built from these.
"""

from __future__ import annotations

import torch

from kvmesh.worker.model.quant import QuantLinear, QuantSpec, add_param
from kvmesh.worker.model.quant.intweight import (
    IntWeightMethod,
    act_order_g_idx,
    pack_cols,
    pack_rows,
    quantize_rtn,
    unpack_cols,
    unpack_rows,
)

BITS = (4, 8)
CHECKPOINT_FORMATS = {"gptq": 1, "gptq_v2": 0}  # what the stored zero is short of the zero


class GPTQMethod(IntWeightMethod):
    name = "gptq"
    suffixes = ("qweight", "qzeros", "scales", "g_idx")

    def __init__(self, spec: QuantSpec) -> None:
        super().__init__(spec)
        params = spec.params
        if self.bits not in BITS:
            raise ValueError(f"GPTQ with {self.bits} bits is not supported (4 or 8)")
        fmt = str(params.get("checkpoint_format") or "gptq")
        if fmt not in CHECKPOINT_FORMATS or params.get("is_marlin_format"):
            raise ValueError(f"GPTQ checkpoint format {fmt!r} is not supported (gptq, gptq_v2)")
        self.zero_offset = CHECKPOINT_FORMATS[fmt]
        self.desc_act = bool(params.get("desc_act", False))
        self.sym = bool(params.get("sym", True))
        self.pack = 32 // self.bits

    def create_weights(self, layer: QuantLinear, dtype: torch.dtype) -> None:
        in_f, out_f = layer.in_features, layer.out_features
        if in_f % self.pack or out_f % self.pack:
            raise ValueError(
                f"GPTQ {self.bits}-bit needs features divisible by {self.pack}; got {in_f}x{out_f}"
            )
        groups = self.groups(in_f)
        add_param(layer, "qweight", (in_f // self.pack, out_f), torch.int32)
        add_param(layer, "qzeros", (groups, out_f // self.pack), torch.int32)
        add_param(layer, "scales", (groups, out_f), torch.float16)
        add_param(layer, "g_idx", (in_f,), torch.int32)

    def fuse(self, suffix: str, parts: list[torch.Tensor], sizes: list[int]) -> torch.Tensor:
        if suffix != "g_idx":
            return torch.cat(parts, dim=-1)
        if any(not torch.equal(parts[0], p) for p in parts[1:]):
            # GPTQ orders q/k/v (and gate/up) by the same input's Hessian: one g_idx for all.
            raise ValueError("GPTQ: the parts of a fused layer have different g_idx; cannot fuse them")
        return parts[0]

    def unpack(self, layer: QuantLinear):
        q = unpack_rows(layer.qweight, self.bits)
        zeros = unpack_cols(layer.qzeros, self.bits) + self.zero_offset
        return q, layer.scales.detach(), zeros, layer.g_idx.detach()

    def load_dense(self, layer: QuantLinear, weight: torch.Tensor) -> None:
        tensors = quantize_gptq(weight, self.bits, self.group_size, sym=self.sym, desc_act=self.desc_act)
        if self.zero_offset == 0:
            tensors["qzeros"] = pack_cols(unpack_cols(tensors["qzeros"], self.bits) + 1, self.bits)
        with torch.no_grad():
            for name, tensor in tensors.items():
                getattr(layer, name).copy_(tensor)


def quantize_gptq(
    weight: torch.Tensor,
    bits: int,
    group_size: int,
    *,
    sym: bool = True,
    desc_act: bool = False,
    importance: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """A dense ``[out, in]`` weight as GPTQ v1 tensors (qweight, qzeros, scales, g_idx), rounded to
    nearest. Under ``desc_act`` the groups follow ``importance`` per input feature (default: the
    weight's column norms, a stand-in for the Hessian diagonal real GPTQ uses)."""
    in_f = weight.shape[1]
    size = in_f if group_size == -1 else group_size
    if desc_act:
        importance = weight.float().norm(dim=0) if importance is None else importance
        g_idx = act_order_g_idx(importance, size)
    else:
        g_idx = torch.arange(in_f, device=weight.device, dtype=torch.int32) // size
    q, scales, zeros = quantize_rtn(weight, bits, group_size, sym=sym, style="gptq", g_idx=g_idx)
    return gptq_tensors(q, scales, zeros, g_idx, bits)


def gptq_tensors(
    q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor, bits: int
) -> dict[str, torch.Tensor]:
    """Integer codes ``q [in, out]``, ``scales``/``zeros [groups, out]`` (zeros >= 1, as
    quantize_rtn makes them) and ``g_idx [in]`` packed as GPTQ v1 tensors."""
    return {
        "qweight": pack_rows(q, bits),
        "qzeros": pack_cols(zeros - 1, bits),  # v1 stores zero - 1
        "scales": scales,
        "g_idx": g_idx.to(torch.int32),
    }


def quantize_gptq_calibrated(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    group_size: int,
    *,
    sym: bool = True,
    desc_act: bool = False,
    damp_percent: float = 0.01,
    block_size: int = 128,
) -> dict[str, torch.Tensor]:
    """A dense ``[out, in]`` weight as GPTQ v1 tensors by GPTQ's error-compensating rounding
    (Frantar et al. 2022) against ``hessian = X^T X [in, in]`` of the layer's inputs (any positive
    multiple of it gives the same result).

    Columns are rounded one at a time; each one's rounding error, divided by its pivot of the
    upper Cholesky factor of ``H^-1``, is spread over the columns not yet rounded (exactly within a
    block of ``block_size`` columns, once per block beyond it), which minimizes ``||X (W - Q)^T||``
    greedily. ``damp_percent`` of the mean diagonal is added to ``H``'s diagonal; inputs never seen
    (a zero diagonal) get weight 0. A group's scale and zero are computed (quantize_rtn's grid) from
    its columns as they stand when its first column is reached; ``group_size -1`` takes one group
    from the whole weight. Under ``desc_act`` columns go in decreasing ``diag(H)`` and each run of
    ``group_size`` of them is a group: layers sharing ``hessian`` get the same ``g_idx``."""
    out_f, in_f = weight.shape
    size = in_f if group_size == -1 else group_size
    maxq = (1 << bits) - 1
    w = weight.detach().float().clone()
    h = hessian.detach().double().clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    if desc_act:
        order = torch.argsort(torch.diagonal(h), descending=True, stable=True)
        w, h = w[:, order], h[order][:, order]
    else:
        order = torch.arange(in_f)
    h += damp_percent * torch.diagonal(h).mean() * torch.eye(in_f, dtype=h.dtype)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).float()
    q = torch.empty(in_f, out_f, dtype=torch.int32)
    scales, zeros = [], []
    for start in range(0, in_f, block_size):
        end = min(start + block_size, in_f)
        block, errors = w[:, start:end].clone(), torch.empty(out_f, end - start)
        for i in range(end - start):
            col = start + i
            if col % size == 0:  # a group starts: its grid from its columns as updated so far
                group = torch.cat([block[:, i:], w[:, end : col + size]], dim=1)[:, :size]
                _, scale, zero = quantize_rtn(group, bits, -1, sym=sym, style="gptq")
                scales.append(scale[0])
                zeros.append(zero[0])
            scale, zero = scales[-1].float(), zeros[-1]
            codes = (torch.round(block[:, i] / scale) + zero).clamp(0, maxq)
            q[col] = codes.to(torch.int32)
            errors[:, i] = (block[:, i] - (codes - zero) * scale) / u[col, col]
            block[:, i:] -= errors[:, i : i + 1] * u[col, col:end][None, :]
        w[:, end:] -= errors @ u[start:end, end:]
    g_idx = torch.empty(in_f, dtype=torch.int32)
    g_idx[order] = (torch.arange(in_f) // size).to(torch.int32)
    codes = torch.empty_like(q)
    codes[order] = q
    return gptq_tensors(codes, torch.stack(scales), torch.stack(zeros), g_idx, bits)


METHOD = GPTQMethod
