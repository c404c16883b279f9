"""4- and 8-bit weight-only integers: what GPTQ and AWQ share.

Both formats store ``W[o, k] = (q[k, o] - zero[g(k), o]) * scale[g(k), o]`` with integers ``q`` of
``bits`` bits packed into int32 words, one zero and one float16 scale per group of input features
and output feature. They differ in how the words are packed:

- GPTQ (AutoGPTQ, GPTQModel): ``qweight [in / pack, out]`` packs consecutive *input* rows, the lowest
  bits holding the first; ``qzeros [groups, out / pack]`` packs consecutive output columns the same
  way and stores ``zero - 1`` (checkpoint format v1, ``gptq``; ``gptq_v2`` stores ``zero``);
  ``g_idx [in]`` names each input feature's group (a permutation of groups under act-order).
- AWQ GEMM (AutoAWQ): ``qweight [in, out / 8]`` and ``qzeros [groups, out / 8]`` pack consecutive
  *output* columns in the interleaved order ``AWQ_ORDER`` (nibble i holds column ``AWQ_ORDER[i]``
  of its eight); zeros are stored as they are; groups are contiguous.

At load (``process_after_loading``) both are repacked into one kernel layout, which
kvmesh.worker.kernels.quant_int reads:

- ``w_packed`` int32 ``[in / pack, out]``: GPTQ's packing along the input dimension (a tile of
  ``BLOCK_K`` input rows is ``BLOCK_K / pack`` rows of words, each row contiguous along the output:
  coalesced loads for any batch), rows in *sorted group order*;
- ``w_scales`` float16 ``[groups, out]`` and ``w_zeros`` uint8 ``[groups, out]`` (the zero itself,
  int16 where a v1 checkpoint's 8-bit zero of 256 needs it);
- ``w_perm`` int32 ``[in]`` or None: under act-order the input rows are sorted by group, so row
  ``k`` multiplies activation column ``w_perm[k]``, and groups become contiguous runs;
- ``w_groups`` int32 ``[in]`` or None: each sorted row's group where the runs are not all
  ``group_size`` long (never for checkpoints the real tools write); None means ``k // group_size``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from kvmesh.worker.model.quant import LinearMethod, QuantLinear, QuantSpec

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of an AWQ word holds column AWQ_ORDER[i] of its 8
AWQ_REVERSE_ORDER = tuple(AWQ_ORDER.index(c) for c in range(8))  # column c sits in this nibble
KERNEL_TENSORS = ("w_packed", "w_scales", "w_zeros", "w_perm", "w_groups")


def _shifts(bits: int, device) -> torch.Tensor:
    return torch.arange(0, 32, bits, dtype=torch.int32, device=device)


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 words in [0, 2**32) -> int32 with the same bits."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack_rows(q: torch.Tensor, bits: int) -> torch.Tensor:
    """``q [K, N]`` (integers in ``[0, 2**bits)``) -> int32 ``[K / pack, N]``: word ``r`` holds rows
    ``r * pack + j`` at bits ``j * bits`` (GPTQ's qweight)."""
    pack = 32 // bits
    k, n = q.shape
    if k % pack:
        raise ValueError(f"{k} rows do not pack into words of {pack}")
    parts = q.to(torch.int64).view(k // pack, pack, n) << _shifts(bits, q.device).to(torch.int64).view(
        1, pack, 1
    )
    return _to_int32(parts.sum(1))


def unpack_rows(words: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of ``pack_rows``: int32 ``[K / pack, N]`` -> int32 ``[K, N]``."""
    pack = 32 // bits
    q = (words.unsqueeze(1) >> _shifts(bits, words.device).view(1, pack, 1)) & ((1 << bits) - 1)
    return q.reshape(words.shape[0] * pack, words.shape[1])


def pack_cols(q: torch.Tensor, bits: int, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """``q [R, N]`` -> int32 ``[R, N / pack]``: word ``c`` holds columns ``c * pack + order[j]`` at
    bits ``j * bits`` (GPTQ's qzeros with ``order`` None, AWQ's qweight and qzeros with
    ``AWQ_ORDER``)."""
    pack = 32 // bits
    r, n = q.shape
    if n % pack:
        raise ValueError(f"{n} columns do not pack into words of {pack}")
    q = q.to(torch.int64).view(r, n // pack, pack)
    if order is not None:
        q = q[:, :, list(order)]
    return _to_int32((q << _shifts(bits, q.device).to(torch.int64)).sum(-1))


def unpack_cols(words: torch.Tensor, bits: int, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """Inverse of ``pack_cols``: int32 ``[R, N / pack]`` -> int32 ``[R, N]``."""
    pack = 32 // bits
    q = (words.unsqueeze(-1) >> _shifts(bits, words.device)) & ((1 << bits) - 1)
    if order is not None:
        q = q[:, :, [order.index(c) for c in range(pack)]]
    return q.reshape(words.shape[0], words.shape[1] * pack)


def act_order_g_idx(importance: torch.Tensor, group_size: int) -> torch.Tensor:
    """GPTQ's ``g_idx`` under act-order: input features taken in decreasing ``importance`` (GPTQ
    uses the Hessian's diagonal), each run of ``group_size`` of them one group."""
    order = torch.argsort(importance, descending=True, stable=True)
    g_idx = torch.empty_like(order)
    g_idx[order] = torch.arange(order.numel(), device=order.device) // group_size
    return g_idx.to(torch.int32)


def quantize_rtn(
    weight: torch.Tensor,
    bits: int,
    group_size: int,
    *,
    sym: bool,
    style: str,
    g_idx: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest quantization of a dense ``[out, in]`` weight in groups of ``group_size``
    input features (-1: one group), as the real tools compute it before packing:

    - ``style="gptq"`` (AutoGPTQ's quantizer): the range always includes 0; symmetric uses zero
      ``2**(bits-1)``; a zero of 0 is raised to 1 so that v1's stored ``zero - 1`` stays in range;
    - ``style="awq"`` (AutoAWQ's pseudo_quantize_tensor): asymmetric, range ``[min, max]``.

    ``g_idx`` (act-order) gives each input feature's group. Returns ``q`` int32 ``[in, out]``,
    ``scales`` float16 ``[groups, out]`` and ``zeros`` int32 ``[groups, out]``; ``q`` is computed
    with the float16 scales, so dequantizing reproduces what was rounded."""
    out_f, in_f = weight.shape
    group_size = in_f if group_size == -1 else group_size
    groups = math.ceil(in_f / group_size)
    maxq = (1 << bits) - 1
    w = weight.detach().t().float()  # [in, out]
    if g_idx is None:
        g_idx = torch.arange(in_f, device=w.device, dtype=torch.int32) // group_size
    g = g_idx.long()
    wmin = torch.full((groups, out_f), math.inf, device=w.device).scatter_reduce(
        0, g[:, None].expand_as(w), w, "amin"
    )
    wmax = torch.full((groups, out_f), -math.inf, device=w.device).scatter_reduce(
        0, g[:, None].expand_as(w), w, "amax"
    )
    if style == "gptq":
        wmin, wmax = wmin.clamp(max=0), wmax.clamp(min=0)
        if sym:
            wmax = torch.maximum(wmin.abs(), wmax)
            wmin = torch.where(wmin < 0, -wmax, wmin)
        empty = (wmin == 0) & (wmax == 0)
        wmin, wmax = torch.where(empty, -1.0, wmin), torch.where(empty, 1.0, wmax)
        scales = ((wmax - wmin) / maxq).half()
        if sym:
            zeros = torch.full_like(scales, (maxq + 1) // 2, dtype=torch.int32)
        else:
            zeros = torch.round(-wmin / scales.float()).clamp(1, maxq).to(torch.int32)
    elif style == "awq":
        scales = ((wmax - wmin).clamp(min=1e-5) / maxq).half()
        zeros = torch.round(-wmin / scales.float()).clamp(0, maxq).to(torch.int32)
    else:
        raise ValueError(f"unknown quantization style {style!r}")
    q = torch.round(w / scales.float()[g]) + zeros[g]
    return q.clamp(0, maxq).to(torch.int32), scales, zeros


class IntWeightMethod(LinearMethod):
    """A weight-only integer method: subclasses say how their checkpoint's tensors read
    (``unpack``) and how a dense weight is written into them (``load_dense``)."""

    name = ""

    def __init__(self, spec: QuantSpec) -> None:
        super().__init__(spec)
        self.bits = int(spec.params.get("bits", 4))
        self.group_size = int(spec.params.get("group_size", 128))
        if self.group_size != -1 and self.group_size <= 0:
            raise ValueError(f"{self.name}: group_size must be -1 or positive, got {self.group_size}")

    def groups(self, in_features: int) -> int:
        return 1 if self.group_size == -1 else math.ceil(in_features / self.group_size)

    def unpack(
        self, layer: QuantLinear
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The checkpoint's tensors as ``q [in, out]``, ``scales [groups, out]``,
        ``zeros [groups, out]`` (the zero itself) and ``g_idx [in]`` (None: contiguous groups)."""
        raise NotImplementedError

    def process_after_loading(self, layer: QuantLinear) -> None:
        q, scales, zeros, g_idx = self.unpack(layer)
        for name in self.suffixes:
            delattr(layer, name)
        in_f = q.shape[0]
        group_size = in_f if self.group_size == -1 else self.group_size
        perm = groups = None
        if g_idx is not None and not torch.equal(g_idx.long(), _contiguous(in_f, group_size, g_idx.device)):
            perm = torch.argsort(g_idx.long(), stable=True)
            q, sorted_groups = q[perm], g_idx.long()[perm]
            if not torch.equal(sorted_groups, _contiguous(in_f, group_size, g_idx.device)):
                groups = sorted_groups.to(torch.int32)  # runs of unequal length: the kernel reads them
            perm = perm.to(torch.int32)
        zero_dtype = torch.uint8 if int(zeros.max()) < 256 and int(zeros.min()) >= 0 else torch.int16
        kernel = {
            "w_packed": pack_rows(q, self.bits),
            "w_scales": scales.to(torch.float16).contiguous(),
            "w_zeros": zeros.to(zero_dtype).contiguous(),
            "w_perm": perm,
            "w_groups": groups,
        }
        for name, tensor in kernel.items():
            setattr(layer, name, None if tensor is None else nn.Parameter(tensor, requires_grad=False))
        layer.group_size = group_size

    def dequantize(self, layer: QuantLinear) -> torch.Tensor:
        """float32 ``[out, in]``, exact: ``(q - zero) * scale`` of a float16 scale and integers of at
        most 9 bits fits float32's mantissa."""
        q = unpack_rows(layer.w_packed, self.bits)
        rows = torch.arange(q.shape[0], device=q.device)
        g = layer.w_groups.long() if layer.w_groups is not None else rows // layer.group_size
        w = (q - layer.w_zeros.int()[g]).float() * layer.w_scales.float()[g]
        if layer.w_perm is not None:
            dense = torch.empty_like(w)
            dense[layer.w_perm.long()] = w
            w = dense
        return w.t()

    def kernel_matmul(self, layer: QuantLinear, x: torch.Tensor, bias=None, config=None) -> torch.Tensor:
        """``x @ W^T (+ bias)`` through the fused Triton kernel over the repacked tensors
        (``config``: a kernel LaunchConfig, default chosen by the kernel)."""
        from kvmesh.worker.kernels.quant_int import int_matmul

        return int_matmul(
            x,
            layer.w_packed,
            layer.w_scales,
            layer.w_zeros,
            bits=self.bits,
            group_size=layer.group_size,
            perm=layer.w_perm,
            group_idx=layer.w_groups,
            bias=bias,
            config=config,
        )

    def apply(self, layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            return self.kernel_matmul(layer, x, layer.bias)
        # The reference: dequantize, then multiply in the activation's dtype. The dense weight is
        # kept after the first product (the CPU serves tests and references, not memory savings).
        dense = getattr(layer, "cpu_dense", None)
        if dense is None or dense.dtype != x.dtype:
            dense = layer.cpu_dense = self.dequantize(layer).to(x.dtype).t().contiguous()  # [in, out]
        out = x @ dense
        return out if layer.bias is None else out + layer.bias.to(x.dtype)


def _contiguous(in_features: int, group_size: int, device) -> torch.Tensor:
    return torch.arange(in_features, device=device) // group_size
