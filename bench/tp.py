"""Tensor-parallel engine benchmark: batch-1 decode and offline batches at TP=1 and TP=2, for the
Llama-3-8B and Llama-3-70B shapes with random weights, beside the weight-bandwidth roofline.

Each run is the offline LLM with ``tensor_parallel_size=N`` and ``load_format="dummy"``: rank 0 (this
process) starts ranks 1..N-1 through the worker's own rank supervisor (no torchrun), and every rank
builds and randomly fills only its own shard on its own GPU, so the 70B shape is never whole on one
GPU (nor on disk: the model directory holds a config.json and a word-level tokenizer only).

Roofline (batch-1 decode): every decode step reads each rank's shard of the weights once (all but
the embedding table, of which a step reads one row), so with per-GPU copy bandwidth ``BW`` and
``B`` weight bytes read per step, ``N`` GPUs give at most ``N * BW / B`` tokens/s. ``BW`` is measured
at the start (2 GiB device-to-device copy, bytes read + written, as bench/gpu_engine.py does). The
all-reduces (two per layer) are not in the roofline; their latency is what TP pays for.

    python bench/tp.py --shape llama3-8b --tp 1,2 --json $OUT/tp8b.json
    python bench/tp.py --shape llama3-70b --tp 2 --json $OUT/tp70b.json
    python bench/tp.py --shape tiny --device cpu --tp 1,2 --batches 4   # the script itself, on gloo
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

from kvmesh.worker import LLM, SamplingParams

SHAPES = {
    "llama3-8b": dict(
        hidden_size=4096,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=14336,
        vocab_size=128256,
    ),
    "llama3-70b": dict(
        hidden_size=8192,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        intermediate_size=28672,
        vocab_size=128256,
    ),
    "tiny": dict(
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=256,
        vocab_size=1024,
    ),
}
LLAMA3 = dict(
    model_type="llama",
    max_position_embeddings=8192,
    rope_theta=500000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    bos_token_id=0,
    eos_token_id=1,
)


def model_dir(shape: str, root: Path) -> Path:
    """config.json and a word-level tokenizer ("t0".."tV-1"): everything LLM reads when weights are dummy."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    path = root / shape
    cfg = LlamaConfig(**SHAPES[shape], **LLAMA3)
    cfg.save_pretrained(path)
    vocab = {f"t{i}": i for i in range(cfg.vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0").save_pretrained(path)
    return path


def weight_bytes(shape: str, elem: int) -> tuple[int, int]:
    """(all weight bytes, bytes one decode step reads: all but the embedding table)."""
    s = SHAPES[shape]
    h, i, v = s["hidden_size"], s["intermediate_size"], s["vocab_size"]
    d = h // s["num_attention_heads"]
    q, kv = s["num_attention_heads"] * d, s["num_key_value_heads"] * d
    layer = h * (q + 2 * kv) + q * h + 3 * h * i + 2 * h
    total = s["num_hidden_layers"] * layer + h + 2 * v * h
    return total * elem, (total - v * h) * elem


def copy_bandwidth(device: torch.device) -> float | None:
    """Bytes/s read + written by a 2 GiB device-to-device copy on one GPU."""
    if device.type != "cuda":
        return None
    import triton.testing

    src = torch.randn(1 << 30, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), return_mode="median")
    return 4 * src.numel() / (ms / 1e3)


def batch1_decode(llm: LLM, prompt: list[int], new: int) -> float:
    """Decode tokens/s of one sequence, timed from its first token to its last."""
    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=new, ignore_eos=True)
    engine.add(engine.make_sequence(f"b1-{time.monotonic_ns()}", prompt, params))
    engine.step()  # the prefill and the first token
    start, tokens = time.perf_counter(), 0
    while engine.has_work():
        tokens += sum(len(o.token_ids) for o in engine.step())  # tokens reach the host: synchronised
    return tokens / (time.perf_counter() - start)


def offline(llm: LLM, batch: int, prompt_len: int, new: int, vocab: int, rng: random.Random) -> float:
    prompts = [[rng.randrange(2, vocab) for _ in range(prompt_len)] for _ in range(batch)]
    params = SamplingParams(temperature=0.0, max_tokens=new, ignore_eos=True)
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    return sum(len(o.outputs[0].token_ids) for o in outs) / elapsed


def run(args, shape: str, tp: int, path: Path, bw: float | None, results: list[dict]) -> None:
    dtype = torch.bfloat16 if args.device != "cpu" else torch.float32
    elem = torch.empty((), dtype=dtype).element_size()
    total, read = weight_bytes(shape, elem)
    vocab = SHAPES[shape]["vocab_size"]
    start = time.perf_counter()
    llm = LLM(
        str(path),
        tensor_parallel_size=tp,
        load_format="dummy",
        device=args.device,
        dtype="bfloat16" if dtype == torch.bfloat16 else "float32",
        max_model_len=args.max_model_len,
        max_num_seqs=max([1, *args.batches]),
        max_num_batched_tokens=args.max_num_batched_tokens,
        gpu_memory_utilization=args.gpu_memory_utilization,
        **({"num_blocks": 512} if args.device == "cpu" else {}),
    )
    load_s = time.perf_counter() - start
    rng = random.Random(0)
    try:
        prompt = [rng.randrange(2, vocab) for _ in range(args.prompt_len)]
        batch1_decode(llm, prompt, 16)  # warm-up: kernels compiled, allocator settled
        tok_s = batch1_decode(llm, prompt, args.new_tokens)
        roof = tp * bw / read if bw else None
        row = {
            "shape": shape,
            "tp": tp,
            "metric": "batch-1 decode",
            "tok_s": round(tok_s, 1),
            "roofline_tok_s": round(roof, 1) if roof else None,
            "of_roofline": round(tok_s / roof, 3) if roof else None,
            "weights_gb": round(total / 1e9, 2),
            "read_per_step_gb_per_gpu": round(read / tp / 1e9, 2),
            "kv_blocks": llm.engine.runner.num_blocks,
            "start_s": round(load_s, 1),
        }
        results.append(row)
        ratio = f" = {row['of_roofline']:.0%} of the {tp}-GPU roofline {roof:.0f}" if roof else ""
        print(f"{shape} TP={tp} batch-1 decode: {tok_s:.1f} tok/s{ratio}", flush=True)
        for batch in args.batches:
            tok_s = offline(llm, batch, args.prompt_len, args.new_tokens, vocab, rng)
            results.append(
                {"shape": shape, "tp": tp, "metric": f"offline batch {batch}", "tok_s": round(tok_s, 1)}
            )
            print(
                f"{shape} TP={tp} offline batch {batch} ({args.prompt_len} in + {args.new_tokens} out): "
                f"{tok_s:.0f} out tok/s",
                flush=True,
            )
    finally:
        llm.engine.runner.close()
        del llm
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", default="llama3-8b", help=f"comma-separated, of {sorted(SHAPES)}")
    parser.add_argument("--tp", default="1,2", help="tensor-parallel sizes, comma-separated")
    parser.add_argument("--batches", default="64,128", help="offline batch sizes ('' for none)")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--max-num-batched-tokens", type=int, default=16384)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args()
    args.batches = [int(b) for b in args.batches.split(",") if b]
    sizes = [int(t) for t in args.tp.split(",") if t]
    shapes = args.shape.split(",")
    for shape in shapes:
        if shape not in SHAPES:
            sys.exit(f"unknown shape {shape!r}; known: {sorted(SHAPES)}")
    device = torch.device(args.device)
    if device.type == "cuda" and max(sizes) > torch.cuda.device_count():
        sys.exit(f"--tp {max(sizes)} needs {max(sizes)} GPUs; {torch.cuda.device_count()} visible")
    bw = copy_bandwidth(torch.device("cuda", 0)) if device.type == "cuda" else None
    if bw:
        torch.cuda.empty_cache()  # the copy's 4 GiB go back before rank 0 sizes its KV pool
    if bw:
        print(f"copy bandwidth of one GPU (read + write): {bw / 1e12:.2f} TB/s", flush=True)
    results: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="kvmesh-tp-bench-") as tmp:
        for shape in shapes:
            path = model_dir(shape, Path(tmp))
            for tp in sizes:
                total, _ = weight_bytes(shape, 2)
                if (
                    device.type == "cuda"
                    and tp == 1
                    and total > 0.8 * torch.cuda.get_device_properties(0).total_memory
                ):
                    print(
                        f"{shape} TP=1 skipped: {total / 1e9:.0f} GB of weights do not fit one GPU",
                        flush=True,
                    )
                    continue
                run(args, shape, tp, path, bw, results)
    if args.json:
        args.json.write_text(json.dumps({"copy_bandwidth": bw, "results": results}, indent=2))


if __name__ == "__main__":
    main()
