"""Quantized weights and KV cache against bf16 on one GPU, same run, random weights of a shape.

Each configuration builds the engine on random weights (``load_format="dummy"``: a dense random
weight quantized by the layer's own method, round-to-nearest for GPTQ), then measures

- batch-1 decode tokens/s (128-token prompt) next to its roofline: the copy bandwidth over the
  bytes one decode step reads (every parameter but the embedding table, as the model holds them:
  FP8 weights and their scales, packed 4-bit words, zeros and scales);
- offline output tokens/s at batch 128 and 256 (512-token prompts);
- the KV pool in blocks, and with ``--kv-util`` a batch the bf16 pool cannot hold at once:
  the same requests with the model-dtype cache and with the FP8 cache at that memory share.

    python bench/quant.py --shape llama3-8b --json $OUT/quant.json
    python bench/quant.py --shape tiny --device cpu --configs bf16,gptq4 --batches 1,4   # smoke
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

from kvmesh.worker import LLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tp import SHAPES, batch1_decode, copy_bandwidth, model_dir, offline  # one definition of each

CONFIGS = {
    "bf16": ({}, None),
    "fp8": ({"quantization": "fp8"}, None),
    "gptq4": ({}, {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True}),
    "awq4": (
        {},
        {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm"},
    ),
    "fp8-kv": ({"kv_cache_dtype": "fp8"}, None),
    "fp8+fp8-kv": ({"quantization": "fp8", "kv_cache_dtype": "fp8"}, None),
}


def decode_bytes(llm: LLM) -> int:
    """Bytes of every tensor one decode step reads: all parameters and buffers but the embedding
    table (the LM head's, tied or not, counts), and the tensors quantized layers keep as attributes
    (repacked weights)."""
    from kvmesh.worker.model.quant import QuantLinear

    model = llm.engine.runner.model
    table = model.embed_tokens.weight
    seen, total = set(), 0
    for module in model.modules():
        tensors = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
        if isinstance(module, QuantLinear):
            tensors += [t for t in vars(module).values() if isinstance(t, torch.Tensor)]
        for t in tensors:
            if t.data_ptr() in seen or (t is table and model.lm_head.weight is not table):
                continue
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def build(args, path: Path, settings: dict, util: float) -> LLM:
    base = dict(
        device=args.device,
        load_format="dummy",
        max_model_len=2048,
        max_num_seqs=max([*args.batches, args.kv_batch]),
        max_num_batched_tokens=8192,
        enable_prefix_caching=False,
    )
    if args.device != "cpu":
        base["gpu_memory_utilization"] = util
    return LLM(str(path), **base, **settings)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--configs", default="bf16,fp8,gptq4,fp8-kv")
    parser.add_argument("--batches", default="1,128,256")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument(
        "--util", type=float, default=0.85, help="gpu_memory_utilization of the throughput runs"
    )
    parser.add_argument(
        "--kv-util", type=float, default=0.28, help="memory share of the KV-capacity runs (0: skip them)"
    )
    parser.add_argument("--kv-batch", type=int, default=256)
    parser.add_argument("--kv-prompt", type=int, default=1024)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    args.batches = [int(b) for b in args.batches.split(",") if b]
    device = torch.device(args.device)
    bw = copy_bandwidth(device)
    vocab = SHAPES[args.shape]["vocab_size"]
    tmp = Path(tempfile.mkdtemp(prefix="kvmesh-quant-"))
    results = []
    if bw:
        print(f"copy bandwidth (read+write) {bw / 1e12:.2f} TB/s", flush=True)

    def case(name: str, util: float, measure) -> None:
        settings, qc = CONFIGS[name]
        path = model_dir(args.shape, tmp / name)
        if qc is not None:
            config = json.loads((path / "config.json").read_text())
            config["quantization_config"] = qc
            (path / "config.json").write_text(json.dumps(config))
        start = time.perf_counter()
        llm = build(args, path, settings, util)
        runner = llm.engine.runner
        result = {
            "config": name,
            "util": util,
            "build_s": time.perf_counter() - start,
            "kv_blocks": runner.num_blocks,
            "kv_gib": runner.num_blocks * runner.block_bytes / 2**30,
            "decode_bytes": decode_bytes(llm),
        }
        measure(llm, result)
        results.append(result)
        print(json.dumps(result), flush=True)
        del llm, runner
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    def throughput(llm: LLM, result: dict) -> None:
        rng = random.Random(0)
        prompt = [rng.randrange(2, vocab) for _ in range(128)]
        offline(llm, 8, 64, 8, vocab, rng)  # warm-up
        for batch in args.batches:
            if batch == 1:
                batch1_decode(llm, prompt, 8)
                tok_s = batch1_decode(llm, prompt, args.new_tokens)
                result["b1_tok_s"] = tok_s
                if bw:
                    result["b1_roofline"] = bw / result["decode_bytes"]
            else:
                result[f"b{batch}_tok_s"] = offline(llm, batch, 512, args.new_tokens, vocab, rng)

    def capacity(llm: LLM, result: dict) -> None:
        rng = random.Random(1)
        start = time.perf_counter()
        tok_s = offline(llm, args.kv_batch, args.kv_prompt, args.new_tokens, vocab, rng)
        result["capacity_tok_s"] = tok_s
        result["capacity_s"] = time.perf_counter() - start
        result["capacity_preemptions"] = llm.engine.stats.preemptions
        result["capacity_tokens_needed"] = args.kv_batch * (args.kv_prompt + args.new_tokens)
        result["capacity_tokens_held"] = llm.engine.runner.num_blocks * llm.engine.block_size

    names = [c for c in args.configs.split(",") if c]
    for name in names:
        case(name, args.util, throughput)
    if args.kv_util:
        for name in ("bf16", "fp8-kv"):
            case(name, args.kv_util, capacity)

    base = next((r for r in results if r["config"] == "bf16" and "b1_tok_s" in r), None)
    print("\n| config | decode bytes/step | KV blocks | batch 1 tok/s (roofline share) | vs bf16 |", end="")
    print("".join(f" batch {b} tok/s | vs bf16 |" for b in args.batches if b != 1))
    print("|---|---|---|---|---|" + "---|---|" * sum(b != 1 for b in args.batches))
    for r in results:
        if "b1_tok_s" not in r and not any(f"b{b}_tok_s" in r for b in args.batches):
            continue
        cells = [r["config"], f"{r['decode_bytes'] / 2**20:.1f} MiB", str(r["kv_blocks"])]
        if "b1_tok_s" in r:
            share = f" ({r['b1_tok_s'] / r['b1_roofline']:.0%})" if "b1_roofline" in r else ""
            cells += [
                f"{r['b1_tok_s']:.1f}{share}",
                f"{r['b1_tok_s'] / base['b1_tok_s']:.2f}x" if base else "-",
            ]
        for b in args.batches:
            if b != 1:
                v = r[f"b{b}_tok_s"]
                cells += [f"{v:.0f}", f"{v / base[f'b{b}_tok_s']:.2f}x" if base else "-"]
        print("| " + " | ".join(cells) + " |")
    for r in results:
        if "capacity_tok_s" in r:
            print(
                f"capacity {r['config']} at util {r['util']}: {r['kv_blocks']} blocks hold "
                f"{r['capacity_tokens_held']} tokens of {r['capacity_tokens_needed']} needed; "
                f"{r['capacity_tok_s']:.0f} out tok/s, {r['capacity_preemptions']} preemptions"
            )
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
