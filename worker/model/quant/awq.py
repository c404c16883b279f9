"""AWQ checkpoints in AutoAWQ's GEMM format (``quant_method: awq``, ``version: gemm``).

Per linear layer: ``qweight`` int32 ``[in, out / 8]`` and ``qzeros`` int32 ``[groups, out / 8]``,
eight 4-bit values per word along the output in AWQ's interleaved order (intweight.AWQ_ORDER),
``scales`` float16 ``[groups, out]`` with ``groups = in / group_size``, ``bias`` when the model has
one. Zeros are stored as they are (``zero_point: true``). The activation-aware part of AWQ is in the
scales the tool chose, so serving needs nothing else; intweight.py says how the kernel's layout is
built from these.
"""

from __future__ import annotations

import torch

from kvmesh.worker.model.quant import QuantLinear, QuantSpec, add_param
from kvmesh.worker.model.quant.intweight import (
    AWQ_ORDER,
    IntWeightMethod,
    pack_cols,
    quantize_rtn,
    unpack_cols,
)


class AWQMethod(IntWeightMethod):
    name = "awq"
    suffixes = ("qweight", "qzeros", "scales")

    def __init__(self, spec: QuantSpec) -> None:
        super().__init__(spec)
        params = spec.params
        version = str(params.get("version", "gemm")).lower()
        if version != "gemm":
            raise ValueError(f"AWQ version {version!r} is not supported (gemm)")
        if self.bits != 4:
            raise ValueError(f"AWQ with {self.bits} bits is not supported (4)")
        if not params.get("zero_point", True):
            raise ValueError("AWQ without zero points (zero_point: false) is not supported")
        if params.get("modules_to_not_convert"):
            raise ValueError("AWQ checkpoints with modules_to_not_convert are not supported")
        if self.group_size == -1:
            raise ValueError("AWQ needs a positive group_size")

    def create_weights(self, layer: QuantLinear, dtype: torch.dtype) -> None:
        in_f, out_f = layer.in_features, layer.out_features
        if in_f % self.group_size or out_f % 8:
            raise ValueError(
                f"AWQ needs in features divisible by group_size {self.group_size} and out features by 8; "
                f"got {in_f}x{out_f}"
            )
        add_param(layer, "qweight", (in_f, out_f // 8), torch.int32)
        add_param(layer, "qzeros", (in_f // self.group_size, out_f // 8), torch.int32)
        add_param(layer, "scales", (in_f // self.group_size, out_f), torch.float16)

    def fuse(self, suffix: str, parts: list[torch.Tensor], sizes: list[int]) -> torch.Tensor:
        return torch.cat(parts, dim=-1)

    def unpack(self, layer: QuantLinear):
        q = unpack_cols(layer.qweight, 4, AWQ_ORDER)
        zeros = unpack_cols(layer.qzeros, 4, AWQ_ORDER)
        return q, layer.scales.detach(), zeros, None

    def load_dense(self, layer: QuantLinear, weight: torch.Tensor) -> None:
        with torch.no_grad():
            for name, tensor in quantize_awq(weight, self.group_size).items():
                getattr(layer, name).copy_(tensor)


def quantize_awq(weight: torch.Tensor, group_size: int) -> dict[str, torch.Tensor]:
    """A dense ``[out, in]`` weight as AWQ GEMM tensors (qweight, qzeros, scales), rounded to
    nearest without AWQ's activation-aware scaling search."""
    q, scales, zeros = quantize_rtn(weight, 4, group_size, sym=False, style="awq")
    return {"qweight": pack_cols(q, 4, AWQ_ORDER), "qzeros": pack_cols(zeros, 4, AWQ_ORDER), "scales": scales}


METHOD = AWQMethod
