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
    return {
        "qweight": pack_rows(q, bits),
        "qzeros": pack_cols(zeros - 1, bits),  # v1: zero - 1 (quantize_rtn keeps zeros >= 1)
        "scales": scales,
        "g_idx": g_idx,
    }


METHOD = GPTQMethod
