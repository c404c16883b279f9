"""FP8 W8A8 linear layers: float8_e4m3fn weights with one float32 scale per output channel, and
activations quantized to float8_e4m3fn per token as they arrive (or with the checkpoint's static
per-tensor input scale), multiplied by Hopper's FP8 matrix units.

Every source ends in the same runtime form, so there is one product:

- a 16-bit checkpoint with ``--quantization fp8``: ``weight`` is registered dense in the model's
  dtype and quantized per channel once loaded (the dense tensor is freed);
- compressed-tensors FP8 (``weights: {num_bits: 8, type: float, strategy: channel | tensor}``,
  ``input_activations`` dynamic per token or static per tensor): ``weight`` F8_E4M3 with
  ``weight_scale`` ``[out, 1]`` or one number, ``input_scale`` when static. A per-tensor weight
  scale becomes per-channel rows (``fuse``), so fused q/k/v parts keep their own scales exactly;
  the static input scales of fused parts (one input) join as their maximum;
- HF's ``fp8`` (``weight_block_size`` e.g. [128, 128]: ``weight_scale_inv`` per block) is
  dequantized and requantized per channel at load, once. Serving the blocks directly would need a
  second product (torch's block-scaled ``_scaled_mm`` is Hopper-only and wants activations scaled
  per 1x128 group, a second quantizer); requantizing keeps one path for every checkpoint at the
  cost of a second rounding, at most half an FP8 step of the row's scale per weight (asserted in
  tests/unit/test_quant_fp8.py). Without ``weight_block_size`` it is AutoFP8's per-tensor form,
  read like compressed-tensors ``tensor``.

``apply``: on CUDA with compute capability >= 8.9 and 16-bit activations, the input is quantized by
one Triton kernel (kvmesh.worker.kernels.fp8_quant: the same bits as ``quantize_rows``), then
multiplied by ``torch._scaled_mm`` with row-wise scales (per-token ``[T, 1]`` times per-channel
``[1, out]``), the bias fused and the output in ``x``'s dtype. torch 2.11 asks for ``in`` and
``out`` to be multiples of 16 (the weight, ``[out, in]`` row-major, is the column-major ``[in, out]``
operand it wants) and sets no rule on the token count, so nothing is padded. Elsewhere (the CPU,
older GPUs, float32 activations, other shapes) the same arithmetic is emulated exactly: ``x``
quantized per token by ``quantize_rows``, dequantized, and multiplied in float32 by the dequantized
weight, kept as a float32 copy (the emulation is for correctness, not memory). torch 2.11's CPU
``_scaled_mm`` takes per-tensor scales only and its sums differ from float32's in the last bits,
so it is not used.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from kvmesh.worker.model.quant import LinearMethod, QuantLinear, QuantSpec, add_param

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
_MIN_AMAX = 1e-12  # an all-zero row still gets a finite scale
# Decoder layers an FP8 checkpoint may not leave unquantized: kvmesh serves them all with one method.
_DECODER_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True, slots=True)
class Fp8Scheme:
    """What a checkpoint holds per layer. ``weight``: "dense" (16-bit, quantized at load),
    "channel", "tensor" or "block"; ``block``: (rows, cols) of a block scale; ``static_input``:
    the layers carry a per-tensor ``input_scale``."""

    weight: str
    block: tuple[int, int] | None = None
    static_input: bool = False

    @classmethod
    def from_spec(cls, spec: QuantSpec) -> Fp8Scheme:
        if not spec.from_checkpoint:
            return cls("dense")
        qc = spec.params
        method = str(qc.get("quant_method", "")).lower()
        if method == "compressed-tensors":
            return _compressed_tensors_scheme(qc)
        if method == "fp8":
            return _hf_fp8_scheme(qc)
        raise ValueError(f"fp8 cannot read a {method or 'unnamed'!r} quantization_config")


def _compressed_tensors_scheme(qc: dict) -> Fp8Scheme:
    groups = list((qc.get("config_groups") or {}).values())
    if len(groups) != 1:
        raise ValueError(
            f"compressed-tensors checkpoints with {len(groups)} config_groups are not supported "
            "(kvmesh serves one FP8 scheme for every linear layer)"
        )
    weights, inputs = groups[0].get("weights") or {}, groups[0].get("input_activations")
    if qc.get("format") not in (None, "float-quantized", "naive-quantized"):
        raise ValueError(
            f"compressed-tensors format {qc.get('format')!r} is not supported (FP8: float-quantized)"
        )
    if weights.get("num_bits") != 8 or weights.get("type") != "float" or not weights.get("symmetric", True):
        raise ValueError(
            "compressed-tensors weights must be symmetric 8-bit float (FP8) for kvmesh's fp8; got "
            f"num_bits={weights.get('num_bits')} type={weights.get('type')!r}"
        )
    strategy = weights.get("strategy")
    if strategy not in ("channel", "tensor"):
        raise ValueError(
            f"compressed-tensors FP8 weight strategy {strategy!r} is not supported (channel, tensor)"
        )
    static = False
    if inputs:
        kind = (
            inputs.get("num_bits"),
            inputs.get("type"),
            inputs.get("strategy"),
            bool(inputs.get("dynamic")),
        )
        if kind == (8, "float", "tensor", False):
            static = True
        elif kind != (8, "float", "token", True):
            raise ValueError(
                "compressed-tensors FP8 input activations must be dynamic per token or static per tensor; "
                f"got strategy={inputs.get('strategy')!r} dynamic={inputs.get('dynamic')}"
            )
    _check_ignore(qc.get("ignore") or [])
    return Fp8Scheme(strategy, static_input=static)


def _hf_fp8_scheme(qc: dict) -> Fp8Scheme:
    activation = qc.get("activation_scheme", "dynamic")
    if activation not in ("dynamic", "static"):
        raise ValueError(f"fp8 activation_scheme {activation!r} is not supported (dynamic, static)")
    _check_ignore(qc.get("modules_to_not_convert") or qc.get("ignored_layers") or [])
    block = qc.get("weight_block_size")
    if block is None:
        return Fp8Scheme("tensor", static_input=activation == "static")
    if activation != "dynamic":
        raise ValueError("fp8 checkpoints with block scales must use activation_scheme dynamic")
    if len(block) != 2 or min(block) < 1:
        raise ValueError(f"fp8 weight_block_size must be [rows, cols]; got {block!r}")
    return Fp8Scheme("block", block=(int(block[0]), int(block[1])))


def _check_ignore(ignore: list[str]) -> None:
    """Refuses checkpoints that keep some decoder linear layers in 16-bit (the LM head may be)."""
    names = [
        f"model.layers.{i}.{'self_attn' if p[0] in 'qkvo' else 'mlp'}.{p}"
        for i in range(2)
        for p in _DECODER_LINEARS
    ]
    for entry in ignore:
        pattern = entry[3:] if entry.startswith("re:") else None
        hit = (
            any(re.match(pattern, n) for n in names) if pattern else any(p in entry for p in _DECODER_LINEARS)
        )
        if hit:
            raise ValueError(
                f"the checkpoint leaves {entry!r} unquantized; kvmesh's fp8 serves every decoder linear "
                "layer in FP8"
            )


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [R, C]`` as FP8 with one float32 scale per row (``[R, 1]``): a row's largest magnitude
    maps to 448. Per token for activations, per output channel for weights."""
    x32 = x.float()
    scale = x32.abs().amax(dim=-1, keepdim=True).clamp_min(_MIN_AMAX) / FP8_MAX
    return (x32 / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def quantize_static(x: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` as FP8 with one given per-tensor scale (a checkpoint's ``input_scale``), returned as
    ``[T, 1]`` rows so both activation schemes reach the same row-wise product."""
    q = (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scale.reshape(1, 1).expand(x.shape[0], 1).contiguous()


def dequantize_blocks(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """float32 ``[out, in]`` of an FP8 weight with one scale per ``block`` (HF ``weight_scale_inv``:
    the factor that multiplies the stored values back)."""
    out_features, in_features = weight.shape
    rows = scale_inv.float().repeat_interleave(block[0], dim=0)[:out_features]
    return weight.float() * rows.repeat_interleave(block[1], dim=1)[:, :in_features]


def _param(tensor: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(tensor, requires_grad=False)


class Fp8LinearMethod(LinearMethod):
    def __init__(self, spec: QuantSpec) -> None:
        super().__init__(spec)
        self.scheme = Fp8Scheme.from_spec(spec)
        kind = self.scheme.weight
        if kind == "dense":
            self.suffixes = ("weight",)
        elif kind == "block":
            self.suffixes = ("weight", "weight_scale_inv")
        else:
            self.suffixes = (
                "weight",
                "weight_scale",
                *(("input_scale",) if self.scheme.static_input else ()),
            )

    def create_weights(self, layer: QuantLinear, dtype: torch.dtype) -> None:
        out_features, in_features = layer.out_features, layer.in_features
        if self.scheme.weight == "dense":
            add_param(layer, "weight", (out_features, in_features), dtype)
            return
        add_param(layer, "weight", (out_features, in_features), FP8)
        if self.scheme.weight == "block":
            rows, cols = self.scheme.block
            add_param(
                layer, "weight_scale_inv", (-(-out_features // rows), -(-in_features // cols)), torch.float32
            )
            return
        add_param(layer, "weight_scale", (out_features, 1), torch.float32)
        if self.scheme.static_input:
            add_param(layer, "input_scale", (), torch.float32)

    def fuse(self, suffix: str, parts: list[torch.Tensor], sizes: list[int]) -> torch.Tensor:
        if suffix == "weight_scale":  # one scale per row, whether the checkpoint gave rows or one number
            rows = [p.float().reshape(-1, 1).expand(n, 1) if p.numel() == 1 else p.float().reshape(n, 1)
                    for p, n in zip(parts, sizes)]  # fmt: skip
            return torch.cat(rows)
        if suffix == "input_scale":  # the parts read one input: the largest scale overflows none
            return torch.stack([p.float().reshape(()) for p in parts]).max()
        if suffix == "weight_scale_inv":
            rows = self.scheme.block[0]
            if any(n % rows for n in sizes[:-1]):
                raise ValueError(
                    f"fp8 block scales of fused parts of {sizes} rows do not align to {rows}-row blocks"
                )
        return torch.cat(parts, dim=0)

    def load_dense(self, layer: QuantLinear, weight: torch.Tensor) -> None:
        q, scale = quantize_rows(weight)
        for name in ("weight_scale_inv", "input_scale"):  # random weights: per channel, dynamic
            if hasattr(layer, name):
                delattr(layer, name)
        layer.weight = _param(q)
        layer.weight_scale = _param(scale)

    def process_after_loading(self, layer: QuantLinear) -> None:
        if hasattr(layer, "weight_scale_inv"):  # block scales: requantized per channel, once
            dense = dequantize_blocks(layer.weight, layer.weight_scale_inv, self.scheme.block)
            del layer.weight_scale_inv
            self.load_dense(layer, dense)
        elif layer.weight.dtype != FP8:  # a 16-bit checkpoint, quantized at load
            self.load_dense(layer, layer.weight.data)
        layer.weight_scale = _param(layer.weight_scale.data.reshape(-1).contiguous())  # [out]
        device = layer.weight.device
        layer.fp8_mm = (
            device.type == "cuda"
            and torch.cuda.get_device_capability(device) >= (8, 9)
            and layer.in_features % 16 == 0
            and layer.out_features % 16 == 0
        )
        # The emulation's float32 weight, made once (converting FP8 per call costs more than the product).
        layer.emulated_weight = None if layer.fp8_mm else self.dequantize(layer)

    def quantize_input(self, layer: QuantLinear, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        input_scale = getattr(layer, "input_scale", None)
        return quantize_rows(x) if input_scale is None else quantize_static(x, input_scale)

    def apply(self, layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
        if layer.fp8_mm and x.dtype in (torch.bfloat16, torch.float16):
            from kvmesh.worker.kernels.fp8_quant import quantize_rows as quantize_rows_kernel

            q, scale = quantize_rows_kernel(x, getattr(layer, "input_scale", None))  # one launch
            return torch._scaled_mm(
                q,
                layer.weight.t(),
                scale_a=scale,
                scale_b=layer.weight_scale.view(1, -1),
                bias=layer.bias,
                out_dtype=x.dtype,
            )
        return self.emulate(layer, x)

    def emulate(self, layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
        """The FP8 product in float32: ``x`` quantized as ``apply`` does, dequantized, times the
        dequantized weight (also the reference of the CUDA path's tests)."""
        q, scale = self.quantize_input(layer, x)
        weight = layer.emulated_weight if layer.emulated_weight is not None else self.dequantize(layer)
        out = (q.float() * scale) @ weight.t()
        if layer.bias is not None:
            out = out + layer.bias.float()
        return out.to(x.dtype)

    def dequantize(self, layer: QuantLinear) -> torch.Tensor:
        if hasattr(layer, "weight_scale_inv"):
            return dequantize_blocks(layer.weight, layer.weight_scale_inv, self.scheme.block)
        if layer.weight.dtype != FP8:
            return layer.weight.float()
        return layer.weight.float() * layer.weight_scale.float().reshape(-1, 1)


METHOD = Fp8LinearMethod
