"""Speculative decoding benchmark: the offline engine with speculation off, with prompt lookup
(ngram) and with a draft model, on copy-heavy prompts; one table of tokens/s, speed-up over
speculation off, acceptance rate and tokens emitted per verification, at several batch sizes and
numbers of proposals k.

Two kinds of model:
- ``--model default`` (or a Hugging Face directory): real weights; prompt lookup on copy-heavy chat
  requests (repeat, correct or quote a given text, drawn from this repository's docs), so the
  acceptance is a real one. ``--draft PATH`` adds a draft model sharing the tokenizer.
- ``--shape llama3-8b`` (or ``tiny``): random weights of that shape (``load_format="dummy"``, the
  directory holds a config.json and a word-level tokenizer only). The draft is made of the
  target's own first ``--draft-layers`` layers, embeddings, final norm and LM head (copied into the
  draft's parameters); prompts are random token runs repeated, for prompt lookup. A random target's
  later layers change its argmax almost always (a 24-of-32-layer draft agrees 4% of the time), so
  ``--tail-scales`` sets the acceptance instead: the output projections (o_proj, down_proj) of the
  target's layers past the draft's are multiplied by each given factor (0: those layers add nothing
  and the draft is the target up to rounding; 1: the plain random model). Every factor is a run of
  its own with its own speculation-off baseline (the same cost per token: only weights change).

Tokens/s counts every generated token over the wall time of ``LLM.generate`` (prefill included).
Speculation switches itself off above ``--disable-batch-size`` running sequences (the engine's
default unless given): at batch 128 the default shows what a loaded server gets.

    python bench/spec_decode.py --model default --device cpu --batches 1 --ks 2,4,6 --new-tokens 128
    python bench/spec_decode.py --shape llama3-8b --draft-layers 2,8 --batches 1,8,32,128 --ks 2,4 \\
        --json $OUT/spec8b.json
    python bench/spec_decode.py --shape llama3-8b --draft-layers 4 --tail-scales 0,0.3 --no-ngram \\
        --batches 1,8,32,128 --ks 2,4
    python bench/spec_decode.py --shape tiny --device cpu --batches 1,8 --ks 2 --new-tokens 16  # smoke
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tp import SHAPES, model_dir  # the random-weight shapes, one definition

TASKS = (
    "Repeat the following text exactly, word for word.",
    "Correct any spelling mistakes in the following text and return the whole text.",
    "Quote the sentence of the following text that best answers: what does this part do?",
)


def doc_passages(count: int, words: int = 180) -> list[str]:
    """``count`` distinct passages of the repository's docs (prose to copy from)."""
    text = " ".join(
        p.read_text() for p in sorted((Path(__file__).resolve().parents[1] / "docs").glob("*.md"))
    )
    tokens = text.split()
    step = max(1, (len(tokens) - words) // max(count, 1))
    return [" ".join(tokens[i * step : i * step + words]) for i in range(count)]


def chat_prompts(llm: LLM, batch: int) -> list[list[int]]:
    passages = doc_passages(batch)
    return [
        llm.encode_chat([{"role": "user", "content": f"{TASKS[i % len(TASKS)]}\n\n{passage}"}])
        for i, passage in enumerate(passages)
    ]


def random_prompts(batch: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    out = []
    for _ in range(batch):
        run = [rng.randrange(2, vocab) for _ in range(48)]
        out.append(run * 4)
    return out


def copy_weights(llm: LLM) -> None:
    """The draft's parameters become the target's first layers, embeddings, norm and LM head
    (in place, so CUDA graphs the draft has captured read them)."""
    target = dict(llm.engine.runner.model.named_parameters())
    with torch.no_grad():
        for name, param in llm.engine.speculator.draft.runner.model.named_parameters():
            param.copy_(target[name])


def scale_tail(llm: LLM, first: int, factor: float) -> None:
    """Multiplies the output projections of the target's layers ``first..`` by ``factor`` (in
    place: captured CUDA graphs read the same tensors)."""
    with torch.no_grad():
        for i, layer in enumerate(llm.engine.runner.model.layers):
            if i >= first:
                layer.self_attn.o_proj.weight.mul_(factor)
                layer.mlp.down_proj.weight.mul_(factor)


def run_case(llm: LLM, prompts: list[list[int]], new_tokens: int) -> dict:
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    stats = llm.engine.stats
    names = ("spec_decode_num_drafts", "spec_decode_num_draft_tokens", "spec_decode_num_accepted_tokens")
    before = [getattr(stats, n) for n in names]
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start, cpu_start = time.perf_counter(), time.process_time()
    outs = llm.generate(prompts, params)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    drafts, proposed, accepted = (getattr(stats, n) - b for n, b in zip(names, before))
    tokens = sum(len(o.token_ids) for o in outs)
    return {
        "tok_s": tokens / elapsed,
        "cpu_ms_per_token": 1e3 * cpu / tokens,  # this process's CPU time, all threads
        "acceptance": accepted / proposed if proposed else None,
        "tokens_per_verification": 1 + accepted / drafts if drafts else None,
        "outputs": [o.token_ids for o in outs],
    }


def build(args, method: str | None, k: int, draft_dir: Path | None) -> LLM:
    settings = dict(
        device=args.device,
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        max_num_seqs=max(args.batches),
        max_num_batched_tokens=args.max_num_batched_tokens,
        enable_prefix_caching=False,  # each case's prompts again: no cache hits between cases
        num_speculative_tokens=k,
    )
    if args.device != "cpu":
        settings["gpu_memory_utilization"] = args.gpu_memory_utilization
    if args.disable_batch_size:
        settings["speculative_disable_batch_size"] = args.disable_batch_size
    if args.shape:
        settings["load_format"] = "dummy"
    if method == "ngram":
        settings["speculative"] = "ngram"
    elif method is not None:
        settings["speculative_model"] = str(draft_dir)
    llm = LLM(args.model_path, **settings)
    if args.tail_scale is not None:
        scale_tail(llm, args.tail_from, args.tail_scale)
    if method is not None and method != "ngram" and args.shape:
        copy_weights(llm)
    return llm


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=None, help="'default' (SmolLM2), or a Hugging Face directory")
    parser.add_argument("--shape", default=None, help=f"random weights of a shape: {sorted(SHAPES)}")
    parser.add_argument("--draft", default=None, help="a draft model directory (with --model)")
    parser.add_argument(
        "--draft-layers", default="", help="with --shape: drafts of the target's first N layers"
    )
    parser.add_argument(
        "--tail-scales",
        default="",
        help="with --shape and one --draft-layers N: runs with the target's layers from N on scaled",
    )
    parser.add_argument("--no-ngram", action="store_true", help="skip prompt lookup")
    parser.add_argument("--batches", default="1,8,32,128")
    parser.add_argument("--ks", default="2,4,6", help="numbers of proposals per step")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="auto", help="auto: bfloat16 on CUDA, float32 on the CPU")
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.8)
    parser.add_argument("--disable-batch-size", type=int, default=None, help="default: the engine's")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if (args.model is None) == (args.shape is None):
        parser.error("give exactly one of --model and --shape")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.batches = [int(b) for b in args.batches.split(",") if b]
    ks = [int(k) for k in args.ks.split(",") if k]
    tmp = Path(tempfile.mkdtemp(prefix="kvmesh-spec-"))
    drafts: dict[str, Path] = {}
    if args.shape:
        args.model_path = str(model_dir(args.shape, tmp))
        for n in (int(x) for x in args.draft_layers.split(",") if x):
            path = model_dir(args.shape, tmp / f"draft{n}")
            config = json.loads((path / "config.json").read_text())
            config["num_hidden_layers"] = n
            (path / "config.json").write_text(json.dumps(config))
            drafts[f"draft-{n}L"] = path
    else:
        args.model_path = args.model
        if args.draft:
            drafts["draft"] = Path(args.draft)
    methods = ([] if args.no_ngram else ["ngram"]) + list(drafts)
    scales = [float(x) for x in args.tail_scales.split(",") if x]
    if scales and (not args.shape or len(drafts) != 1):
        parser.error("--tail-scales needs --shape and exactly one --draft-layers value")
    args.tail_from = int(args.draft_layers) if scales else 0

    rows, results = [], []
    baseline: dict[int, dict] = {}
    cases = [(None, 0)] + [(m, k) for m in methods for k in ks]
    runs = [(s, c) for s in scales for c in cases] if scales else [(None, c) for c in cases]
    for args.tail_scale, (method, k) in runs:
        try:
            llm = build(args, method, max(k, 1), drafts.get(method or ""))
        except Exception as e:  # one case that cannot start (memory) leaves the others' figures
            print(f"{method} k={k}: could not start: {e!r}", flush=True)
            if method is None:
                raise
            continue
        if args.shape:
            vocab = SHAPES[args.shape]["vocab_size"]
            prompts_for = {b: random_prompts(b, vocab) for b in args.batches}
        else:
            prompts_for = {b: chat_prompts(llm, b) for b in args.batches}
        for batch in args.batches:  # warm-up: kernels compiled and tuned for each batch's shapes
            run_case(llm, prompts_for[batch], 8)
        for batch in args.batches:
            r = run_case(llm, prompts_for[batch], args.new_tokens)
            if method is None:
                baseline[batch] = r
            same = r["outputs"] == baseline[batch]["outputs"]
            speedup = r["tok_s"] / baseline[batch]["tok_s"]
            name = (method or "off") + ("" if args.tail_scale is None else f" (tail x{args.tail_scale:g})")
            acc = "-" if r["acceptance"] is None else f"{r['acceptance']:.2f}"
            tpv = "-" if r["tokens_per_verification"] is None else f"{r['tokens_per_verification']:.2f}"
            tok_s = f"{r['tok_s']:.1f}"
            cpu = f"{r['cpu_ms_per_token']:.1f}"
            row = (
                name,
                str(k) if method else "-",
                batch,
                tok_s,
                f"{speedup:.2f}x",
                cpu,
                acc,
                tpv,
                "yes" if same else "NO",
            )
            rows.append(row)
            results.append({k2: v for k2, v in r.items() if k2 != "outputs"} | {
                "method": name, "k": k, "batch": batch, "tail_scale": args.tail_scale,
                "speedup": speedup, "identical": same})  # fmt: skip
            print(" | ".join(str(c) for c in rows[-1]), flush=True)
        del llm
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    source = f"--shape {args.shape}" if args.shape else f"--model {args.model}"
    print(f"\n{source}, device {args.device}, {args.new_tokens} new tokens per request, greedy")
    print("| method | k | batch | tok/s | vs off | CPU ms/token | acceptance | tokens/verif. | same |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(str(c) for c in row) + " |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
