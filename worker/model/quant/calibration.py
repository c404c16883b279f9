"""GPTQ calibration: the inputs every decoder linear layer sees on calibration text, as the Hessians
``X^T X`` that gptq.quantize_gptq_calibrated rounds each weight against.

The dense model runs in float32 on the CPU through transformers, **sequentially**: the first
decoder layer's inputs are captured once, then each layer in turn is run over them with forward
hooks on its linear layers (summing ``X^T X`` in float64), its seven weights are quantized and
replaced by their dequantized values, and the layer is run again to give the next layer its inputs.
So layer ``i`` is calibrated on what the already-quantized layers ``< i`` produce, as the served
model will see. Within a layer the four inputs come from the dense layer (GPTQ's
``true_sequential`` would also requantize o/down after q/k/v and gate/up; not done here). Layers
reading the same input (q/k/v; gate/up) share one Hessian, hence under act-order one ``g_idx``.

The text is tokenized with the model's tokenizer (no special tokens) and cut into sequences of
``sequence_length`` tokens, ``num_sequences`` of them spread evenly over it. Without a file the
repository's own docs/*.md are used (not quality.py's prompts, which measure the result). When the
tokenizer has a chat template (and ``chat``), every sequence starts with the template's tokens
before a user message (for SmolLM2-Instruct its default system prompt and ``<|im_start|>user``),
as the served model sees them: calibrated on plain text only, SmolLM2's MLP layers came out worse
than rounding to nearest on chat prompts.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch

# Layers that read the same input share one Hessian (and so GPTQ's act-order).
SHARED_INPUT = {"self_attn.q_proj": "qkv", "self_attn.k_proj": "qkv", "self_attn.v_proj": "qkv"}
SHARED_INPUT |= {"mlp.gate_proj": "gate_up", "mlp.up_proj": "gate_up"}
LINEARS = (*SHARED_INPUT, "self_attn.o_proj", "mlp.down_proj")
DOCS = Path(__file__).resolve().parents[3] / "docs"
BATCH = 8  # sequences per forward


@dataclass(slots=True)
class Calibration:
    text_file: Path | None = None  # None: the repository's docs/*.md
    num_sequences: int = 32
    sequence_length: int = 256
    damp_percent: float = 0.01  # of the Hessian's mean diagonal, added to its diagonal
    chat: bool = True  # sequences start as a chat's user message, where the tokenizer has a template

    def check(self) -> None:
        if self.num_sequences <= 0 or self.sequence_length <= 0:
            raise ValueError("--calibration-seqs and --calibration-len must be positive")
        if not 0 <= self.damp_percent < 1:
            raise ValueError(f"--damp-percent must be in [0, 1), got {self.damp_percent}")


def calibration_text(calibration: Calibration) -> str:
    if calibration.text_file is not None:
        return Path(calibration.text_file).read_text(encoding="utf-8")
    files = sorted(DOCS.glob("*.md"))
    if not files:
        raise ValueError(f"no default calibration text ({DOCS}/*.md); pass --calibration FILE")
    return "\n\n".join(path.read_text(encoding="utf-8") for path in files)


def chat_prefix(tokenizer) -> list[int]:
    """The chat template's tokens before a user message's content ([] without a template)."""
    if not getattr(tokenizer, "chat_template", None):
        return []
    marker = "\x00calibration\x00"
    text = tokenizer.apply_chat_template([{"role": "user", "content": marker}], tokenize=False)
    return tokenizer(text.split(marker)[0], add_special_tokens=False)["input_ids"]


def calibration_sequences(tokenizer, calibration: Calibration) -> torch.Tensor:
    """``[n, sequence_length]`` token ids, ``n = min(num_sequences, whole runs in the text)``: the
    chat prefix (``calibration.chat``), then one of the text's consecutive runs of the remaining
    length, the runs taken evenly over the text."""
    ids = tokenizer(calibration_text(calibration), add_special_tokens=False, verbose=False)["input_ids"]
    prefix = chat_prefix(tokenizer) if calibration.chat else []
    if len(prefix) >= calibration.sequence_length:
        raise ValueError(
            f"--calibration-len {calibration.sequence_length} leaves no room after the chat "
            f"template's {len(prefix)} tokens"
        )
    length = calibration.sequence_length - len(prefix)
    whole = len(ids) // length
    if whole == 0:
        raise ValueError(
            f"the calibration text has {len(ids)} tokens, fewer than one sequence's {length} "
            f"(--calibration-len {calibration.sequence_length} less {len(prefix)} of chat template)"
        )
    runs = torch.tensor(ids[: whole * length]).view(whole, length)
    picked = torch.linspace(0, whole - 1, min(calibration.num_sequences, whole)).round().long()
    return torch.cat([torch.tensor(prefix, dtype=torch.long).expand(len(picked), -1), runs[picked]], 1)


class _Captured(Exception):
    pass


def _first_layer_inputs(model, sequences: torch.Tensor) -> list[tuple[torch.Tensor, dict]]:
    """(hidden states, the other arguments) the first decoder layer is called with, per batch."""
    captured = []

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append((hidden, dict(kwargs)))
        raise _Captured

    handle = model.model.layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in sequences.split(BATCH):
            with contextlib.suppress(_Captured):
                model.model(input_ids=batch, use_cache=False)
    finally:
        handle.remove()
    return captured


def _run(layer, inputs: list[tuple[torch.Tensor, dict]]) -> list[tuple[torch.Tensor, dict]]:
    outputs = []
    for hidden, kwargs in inputs:
        out = layer(hidden, **kwargs)
        outputs.append((out[0] if isinstance(out, tuple) else out, kwargs))
    return outputs


def _layer_hessians(layer, inputs) -> dict[str, torch.Tensor]:
    """``X^T X`` (float64) of each distinct input of the layer's linear layers over ``inputs``."""
    modules = dict(layer.named_modules())
    hessians: dict[str, torch.Tensor] = {}

    def accumulate(key: str):
        def hook(module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            gram = (x.t() @ x).double()
            hessians[key] = hessians[key] + gram if key in hessians else gram

        return hook

    keys = {SHARED_INPUT.get(name, name): name for name in LINEARS}
    handles = [modules[name].register_forward_pre_hook(accumulate(key)) for key, name in keys.items()]
    try:
        _run(layer, inputs)
    finally:
        for handle in handles:
            handle.remove()
    return hessians


def _dequantize(tensors: dict[str, torch.Tensor], bits: int) -> torch.Tensor:
    from kvmesh.worker.model.quant.intweight import unpack_cols, unpack_rows

    q = unpack_rows(tensors["qweight"], bits)
    zeros = unpack_cols(tensors["qzeros"], bits) + 1  # v1
    g = tensors["g_idx"].long()
    return ((q - zeros[g]).float() * tensors["scales"].float()[g]).t()


@torch.no_grad()
def calibrate_gptq(
    src: Path,
    calibration: Calibration,
    bits: int,
    group_size: int,
    *,
    sym: bool,
    desc_act: bool,
    hessians: dict[str, torch.Tensor] | None = None,
) -> tuple[dict[str, dict[str, torch.Tensor]], int]:
    """GPTQ tensors of every decoder linear layer of the dense model in ``src``, keyed by the
    layer's name (``model.layers.3.mlp.down_proj``), and the number of calibration sequences used.
    ``hessians``, when given, receives each layer's ``X^T X`` under the same names."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kvmesh.worker.model.quant.gptq import quantize_gptq_calibrated

    calibration.check()
    sequences = calibration_sequences(AutoTokenizer.from_pretrained(src), calibration)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    inputs = _first_layer_inputs(model, sequences)
    quantized: dict[str, dict[str, torch.Tensor]] = {}
    for index, layer in enumerate(model.model.layers):
        layer_hessians = _layer_hessians(layer, inputs)
        modules = dict(layer.named_modules())
        for name in LINEARS:
            hessian = layer_hessians[SHARED_INPUT.get(name, name)]
            weight = modules[name].weight
            tensors = quantize_gptq_calibrated(
                weight,
                hessian,
                bits,
                group_size,
                sym=sym,
                desc_act=desc_act,
                damp_percent=calibration.damp_percent,
            )
            weight.copy_(_dequantize(tensors, bits))
            quantized[f"model.layers.{index}.{name}"] = tensors
            if hessians is not None:
                hessians[f"model.layers.{index}.{name}"] = hessian
        inputs = _run(layer, inputs)
    return quantized, len(sequences)
