"""Writes a GPTQ or AWQ checkpoint of a dense Hugging Face model directory::

    python -m kvmesh.worker.model.quant.make_checkpoint --method gptq|awq --bits 4 --group-size 128 \\
        [--desc-act] [--no-sym] [--calibration FILE] [--calibration-seqs N] [--calibration-len L] \\
        [--damp-percent P] [--rtn] SRC_DIR DST_DIR

GPTQ is calibrated by default: GPTQ's error-compensating rounding against the Hessians of each
layer's inputs on calibration text (calibration.py; default text: the repository's docs), with
``--desc-act`` ordering columns by the Hessian's diagonal. ``--rtn`` rounds to nearest instead
(``--desc-act`` then orders by the input features' weight norms), and AWQ is always rounded to
nearest (no activation-aware scale search). Either way the tensors are packed and named exactly as
AutoGPTQ/GPTQModel (format v1, ``checkpoint_format: gptq``) and AutoAWQ (GEMM) write them: the
seven linear layers of every decoder layer become ``qweight``/``qzeros``/``scales`` (+ ``g_idx``
for GPTQ) in float16 scales and int32 words, biases float16; the embedding, norms and LM head are
copied unchanged. config.json gets the tools' ``quantization_config``; tokenizer and generation
files are copied.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path

import torch

from kvmesh.worker.model.quant.calibration import SHARED_INPUT, Calibration, calibrate_gptq

LINEAR = re.compile(r"model\.layers\.(\d+)\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.(weight|bias)")
DEFAULT = Calibration()
SKIPPED_FILES = ("config.json", "model.safetensors.index.json", "quantize_config.json", "quant_config.json")


def quantization_config(
    method: str, bits: int, group_size: int, desc_act: bool, sym: bool, quantizer: str, damp_percent: float
) -> dict:
    if method == "gptq":
        return {
            "quant_method": "gptq",
            "bits": bits,
            "group_size": group_size,
            "desc_act": desc_act,
            "sym": sym,
            "damp_percent": damp_percent,
            "static_groups": False,
            "true_sequential": True,
            "checkpoint_format": "gptq",
            "model_name_or_path": None,
            "model_file_base_name": "model",
            "meta": {"quantizer": [quantizer]},
        }
    return {
        "quant_method": "awq",
        "bits": bits,
        "group_size": group_size,
        "zero_point": True,
        "version": "gemm",
        "modules_to_not_convert": None,
    }


def check_settings(method: str, bits: int, group_size: int, desc_act: bool, sym: bool) -> None:
    """Raises ValueError for settings the format (or kvmesh) does not have."""
    if method not in ("gptq", "awq"):
        raise ValueError(f"--method must be gptq or awq, got {method!r}")
    if group_size != -1 and group_size <= 0:
        raise ValueError(f"--group-size must be -1 or positive, got {group_size}")
    if method == "gptq" and bits not in (4, 8):
        raise ValueError(f"GPTQ with {bits} bits is not supported (4 or 8)")
    if method == "awq":
        if bits != 4:
            raise ValueError(f"AWQ GEMM checkpoints are 4-bit; got --bits {bits}")
        if desc_act or not sym:
            raise ValueError("--desc-act and --no-sym are GPTQ settings (AWQ is asymmetric, groups in order)")
        if group_size == -1:
            raise ValueError("AWQ needs a positive --group-size")


def _read_dense(src: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{src} has no *.safetensors files")
    tensors: dict[str, torch.Tensor] = {}
    for path in files:
        with safe_open(path, framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                tensors[name] = f.get_tensor(name)
    return tensors


def quantize_state(
    state: dict[str, torch.Tensor],
    method: str,
    bits: int,
    group_size: int,
    desc_act: bool,
    sym: bool,
    calibrated: dict[str, dict[str, torch.Tensor]] | None = None,
) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors: every decoder linear layer quantized (``calibrated``: GPTQ's
    tensors by layer name from calibration.calibrate_gptq; else rounded to nearest), the rest as
    they are."""
    from kvmesh.worker.model.quant.awq import quantize_awq
    from kvmesh.worker.model.quant.gptq import quantize_gptq

    importance: dict[tuple[str, str], torch.Tensor] = {}
    if desc_act and calibrated is None:  # one order per input: the column norms of every layer that reads it
        for name, weight in state.items():
            match = LINEAR.fullmatch(name)
            if match and match[4] == "weight":
                key = (match[1], SHARED_INPUT.get(match[2], match[2]))
                importance[key] = importance.get(key, 0) + weight.float().square().sum(0)
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        match = LINEAR.fullmatch(name)
        if match is None:
            out[name] = tensor
            continue
        prefix = name.removesuffix("." + match[4])
        if match[4] == "bias":
            out[name] = tensor.to(torch.float16)
            continue
        if calibrated is not None:
            parts = calibrated[prefix]
        elif method == "gptq":
            key = (match[1], SHARED_INPUT.get(match[2], match[2]))
            parts = quantize_gptq(
                tensor, bits, group_size, sym=sym, desc_act=desc_act, importance=importance.get(key)
            )
        else:
            if tensor.shape[1] % group_size:
                raise ValueError(f"AWQ: {name} has {tensor.shape[1]} inputs, not a multiple of --group-size")
            parts = quantize_awq(tensor, group_size)
        for suffix, value in parts.items():
            out[f"{prefix}.{suffix}"] = value.contiguous()
    return out


def make_checkpoint(
    src: Path,
    dst: Path,
    method: str,
    bits: int,
    group_size: int,
    desc_act: bool = False,
    sym: bool = True,
    calibration: Calibration | None = None,
) -> Path:
    """Writes the quantized checkpoint of ``src`` into ``dst`` (created); returns ``dst``.
    ``calibration`` (GPTQ only) calibrates it; None rounds to nearest."""
    from safetensors.torch import save_file

    check_settings(method, bits, group_size, desc_act, sym)
    if calibration is not None and method != "gptq":
        raise ValueError("calibration is for GPTQ; AWQ checkpoints are rounded to nearest")
    config = json.loads((src / "config.json").read_text())
    if config.get("quantization_config"):
        raise ValueError(f"{src} is already quantized ({config['quantization_config'].get('quant_method')})")
    calibrated, quantizer, damp_percent = None, "kvmesh make_checkpoint (round-to-nearest)", 0.01
    if calibration is not None:
        calibrated, used = calibrate_gptq(src, calibration, bits, group_size, sym=sym, desc_act=desc_act)
        quantizer = (
            f"kvmesh make_checkpoint (gptq, {used} calibration sequences of {calibration.sequence_length})"
        )
        damp_percent = calibration.damp_percent
    state = quantize_state(_read_dense(src), method, bits, group_size, desc_act, sym, calibrated)
    dst.mkdir(parents=True, exist_ok=True)
    for path in src.iterdir():  # tokenizer, chat template, generation config
        if path.is_file() and path.suffix != ".safetensors" and path.name not in SKIPPED_FILES:
            shutil.copy2(path, dst / path.name)
    qc = quantization_config(method, bits, group_size, desc_act, sym, quantizer, damp_percent)
    config["quantization_config"] = qc
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if method == "gptq":  # AutoGPTQ also writes its settings on their own
        (dst / "quantize_config.json").write_text(
            json.dumps({k: v for k, v in qc.items() if k != "meta"}, indent=2)
        )
    save_file(state, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", required=True, choices=("gptq", "awq"))
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument(
        "--group-size", type=int, default=128, help="input features per group; -1: per channel"
    )
    parser.add_argument("--desc-act", action="store_true", help="GPTQ act-order groups")
    parser.add_argument("--sym", action=argparse.BooleanOptionalAction, default=True, help="GPTQ symmetric")
    parser.add_argument("--rtn", action="store_true", help="GPTQ rounded to nearest, not calibrated")
    parser.add_argument("--calibration", type=Path, help="GPTQ calibration text (default: docs/*.md)")
    parser.add_argument(
        "--calibration-seqs", type=int, help=f"calibration sequences (default {DEFAULT.num_sequences})"
    )
    parser.add_argument(
        "--calibration-len", type=int, help=f"tokens a sequence (default {DEFAULT.sequence_length})"
    )
    parser.add_argument(
        "--damp-percent", type=float, help=f"GPTQ dampening, of mean diag(H) (default {DEFAULT.damp_percent})"
    )
    parser.add_argument(
        "--calibration-chat",
        action=argparse.BooleanOptionalAction,
        help="start each sequence with the chat template's user prefix (default: yes)",
    )
    parser.add_argument("src", type=Path)
    parser.add_argument("dst", type=Path)
    args = parser.parse_args(argv)
    try:
        calibration = _calibration(args)
        make_checkpoint(
            args.src, args.dst, args.method, args.bits, args.group_size, args.desc_act, args.sym, calibration
        )
    except (ValueError, FileNotFoundError) as e:
        print(f"make_checkpoint: {e}", file=sys.stderr)
        return 2
    print(f"Wrote {args.method} {args.bits}-bit checkpoint to {args.dst}")
    return 0


def _calibration(args: argparse.Namespace) -> Calibration | None:
    """The calibration the flags ask for: GPTQ without --rtn; unset flags keep Calibration's defaults."""
    given = {
        "text_file": args.calibration,
        "num_sequences": args.calibration_seqs,
        "sequence_length": args.calibration_len,
        "damp_percent": args.damp_percent,
        "chat": args.calibration_chat,
    }
    given = {k: v for k, v in given.items() if v is not None}
    if args.method != "gptq" or args.rtn:
        if given:
            raise ValueError("--calibration* and --damp-percent calibrate GPTQ (not with AWQ or --rtn)")
        return None
    return Calibration(**given)


if __name__ == "__main__":
    sys.exit(main())
