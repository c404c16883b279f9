"""Quantized linear layers: how a decoder's linear layer stores its weight and multiplies by it.

The four linear layers of every decoder layer (the fused ``qkv_proj`` and ``gate_up_proj``,
``o_proj``, ``down_proj``) are ``QuantLinear`` modules when the engine serves a quantized model;
the embedding, the norms and the LM head keep the model's dtype. Each method (fp8.py, gptq.py,
awq.py, gguf.py) is a ``LinearMethod``: the tensors a layer holds, how the parts of a fused layer
join, how a dense weight is quantized into them (16-bit checkpoints quantized at load, random
weights for benchmarks, checkpoints made by the tests) and the forward product.

``--quantization`` (``EngineConfig.quantization``) chooses:

- ``auto``: the checkpoint's own format (its config.json ``quantization_config``); a 16-bit
  checkpoint stays 16-bit, and a GGUF file is expanded (until its kernel is proven on a GPU);
- ``none``: dense weights in the model's dtype (a GGUF file is expanded, as it always was);
- ``fp8``, ``gptq``, ``awq``, ``gguf``: that method; a checkpoint in another format is an error,
  except that ``fp8`` quantizes a 16-bit checkpoint at load.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from kvmesh.worker.engine.config import KV_CACHE_DTYPES, QUANTIZATIONS

__all__ = ["KV_CACHE_DTYPES", "QUANTIZATIONS", "LinearMethod", "QuantLinear", "QuantSpec"]


@dataclass(frozen=True, slots=True)
class QuantSpec:
    """The method a model is served with and its settings (from the checkpoint, or defaults)."""

    method: str  # "fp8" | "gptq" | "awq" | "gguf"
    params: dict[str, Any] = field(default_factory=dict)  # e.g. bits, group_size, zero_point
    from_checkpoint: bool = True  # False: a dense checkpoint quantized at load


class LinearMethod:
    """How a ``QuantLinear`` holds and applies its weight. Subclasses set ``suffixes`` (the
    checkpoint tensors of one layer, e.g. ``("qweight", "qzeros", "scales")``) and implement
    ``create_weights`` and ``apply``."""

    suffixes: tuple[str, ...] = ("weight",)

    def __init__(self, spec: QuantSpec) -> None:
        self.spec = spec

    def create_weights(self, layer: QuantLinear, dtype: torch.dtype) -> None:
        """Registers the layer's tensors (parameters with ``requires_grad=False``, on the meta
        device: ``build_model`` allocates them) with the shapes the checkpoint holds; ``dtype`` is
        the model's."""
        raise NotImplementedError

    def fuse(self, suffix: str, parts: list[torch.Tensor], sizes: list[int]) -> torch.Tensor:
        """Joins the parts of a fused layer (q, k, v or gate, up) read from the checkpoint under
        ``suffix`` along the output dimension; ``sizes`` are the parts' output features. The tensors
        of ``o_proj`` and ``down_proj`` pass through it too, as one part, so every layer's tensors
        take one shape (a per-tensor scale can become per-row scales here). Default: rows of
        ``[out, ...]`` tensors."""
        return torch.cat(parts, dim=0)

    def load_dense(self, layer: QuantLinear, weight: torch.Tensor) -> None:
        """Quantizes a dense ``[out, in]`` weight into the layer's tensors (random weights for
        benchmarks, checkpoints the tests make)."""
        raise NotImplementedError(f"{type(self).__name__} cannot quantize a dense weight")

    def checkpoint_tensors(self, state: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
        """The tensors ``load_weights`` reads, given the checkpoint directory's ``state`` (gguf.py
        reads the linear layers' blocks from the .gguf file instead). Default: ``state``."""
        return state

    def process_after_loading(self, layer: QuantLinear) -> None:
        """Called once every tensor is loaded: repacks them for the kernels."""

    def apply(self, layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
        """``x @ W^T (+ bias)`` for ``x [T, in]``, in ``x``'s dtype."""
        raise NotImplementedError

    def dequantize(self, layer: QuantLinear) -> torch.Tensor:
        """The dense ``[out, in]`` weight the layer's tensors stand for (references, tests)."""
        raise NotImplementedError


class QuantLinear(nn.Module):
    """A linear layer whose weight a ``LinearMethod`` holds; the bias, when present, stays in the
    model's dtype under the checkpoint's name ``bias``."""

    def __init__(self, in_features: int, out_features: int, bias: bool, method: LinearMethod) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.method = method
        self.prefix = ""  # the layer's name in the model (build_model sets it before create_weights)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

    def create_weights(self, dtype: torch.dtype) -> None:
        self.method.create_weights(self, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.method.apply(self, x)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, method={self.method.spec.method}"


def add_param(layer: nn.Module, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    """Registers an empty, frozen parameter (any dtype, integers included) on the meta device."""
    layer.register_parameter(
        name, nn.Parameter(torch.empty(shape, dtype=dtype, device="meta"), requires_grad=False)
    )


def method_for(spec: QuantSpec | None) -> LinearMethod | None:
    """The linear method serving ``spec`` (None: dense layers)."""
    if spec is None:
        return None
    from importlib import import_module

    try:
        module = import_module(f"kvmesh.worker.model.quant.{spec.method}")
    except ModuleNotFoundError as e:
        raise ValueError(f"quantization {spec.method!r} is not available in this build") from e
    return module.METHOD(spec)


def checkpoint_quantization(hf_config) -> dict[str, Any] | None:
    """The checkpoint's ``quantization_config`` as a dict (None for a dense checkpoint)."""
    qc = getattr(hf_config, "quantization_config", None)
    if qc is None:
        return None
    return qc if isinstance(qc, dict) else qc.to_dict()


def resolve(requested: str, hf_config, *, gguf_file=None, device: torch.device) -> QuantSpec | None:
    """The quantization a model is served with. ``gguf_file``: the GGUF file a model came from
    (its converted directory holds dense weights; ``gguf`` reads the quantized ones from the file).
    Raises ValueError with one line a user can act on when the request cannot be served."""
    if requested not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)}; got {requested!r}")
    own = checkpoint_quantization(hf_config)
    own_method = _method_of(own) if own else None
    if requested == "none":
        if own_method is not None:
            raise ValueError(
                f"the checkpoint is quantized ({own_method}); --quantization none cannot expand it, "
                "serve it with --quantization auto"
            )
        return None
    if requested == "auto":
        if own_method is not None:
            return _spec_from_checkpoint(own_method, own)
        # A GGUF file is expanded under auto for now, on a GPU too: the blocks' kernel has not yet run
        # compiled on one (docs/quantization.md); --quantization gguf serves the blocks.
        return None
    if requested == "gguf":
        if gguf_file is None:
            raise ValueError("--quantization gguf needs a .gguf model")
        return QuantSpec("gguf", {"file": str(gguf_file)})
    if own_method is None:
        if requested == "fp8":
            return QuantSpec("fp8", {"weight": "channel", "activation": "dynamic"}, from_checkpoint=False)
        raise ValueError(
            f"--quantization {requested} needs a {requested.upper()} checkpoint (config.json has no "
            "quantization_config); only fp8 quantizes a 16-bit checkpoint at load"
        )
    if own_method != requested:
        raise ValueError(
            f"the checkpoint is {own_method}-quantized; --quantization {requested} cannot serve it"
        )
    return _spec_from_checkpoint(own_method, own)


def _method_of(qc: dict[str, Any]) -> str:
    """The method a ``quantization_config`` describes: fp8, gptq or awq (compressed-tensors
    checkpoints of FP8 weights count as fp8). Raises ValueError for others."""
    name = str(qc.get("quant_method", "")).lower()
    if name in ("gptq", "awq", "fp8"):
        return name
    if name == "compressed-tensors":
        return "fp8"  # fp8.py reads the scheme and refuses the ones it cannot serve
    raise ValueError(f"checkpoint quantization {name or 'of unknown kind'!r} is not supported "
                     "(supported: fp8, compressed-tensors FP8, gptq, awq)")  # fmt: skip


def _spec_from_checkpoint(method: str, qc: dict[str, Any]) -> QuantSpec:
    return QuantSpec(method, dict(qc), from_checkpoint=True)


def process_after_loading(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, QuantLinear):
            module.method.process_after_loading(module)
