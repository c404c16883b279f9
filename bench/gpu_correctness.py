"""GPU correctness: kvmesh's greedy output against transformers' generate() on the GPU.

Small random-weight models (a Llama with GQA 4, a Qwen2 with q/k/v biases and tied
embeddings), float32 and bf16, eight prompts of 5..511 tokens, 48 new tokens each.
The engine runs them concurrently with small prefill chunks (mixed prefill/decode
steps), with CUDA graphs for decode, then again to hit the prefix cache, and once
eagerly. transformers runs each prompt alone. Prints one table; exits 1 when a
float32 generation differs (bf16 may drift after near-ties, so it is reported as
the share of tokens before the first difference).

    python bench/gpu_correctness.py
"""

from __future__ import annotations

import random
import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_engine import word_tokenizer

from kvmesh.worker import LLM, SamplingParams
from kvmesh.worker.model import loader

MODELS = {
    "llama-gqa4": dict(
        model_type="llama",
        hidden_size=512,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        intermediate_size=1376,
        vocab_size=8192,
        max_position_embeddings=4096,
        initializer_range=0.05,
    ),
    "qwen2-bias-tied": dict(
        model_type="qwen2",
        hidden_size=448,
        num_hidden_layers=4,
        num_attention_heads=7,
        num_key_value_heads=1,
        intermediate_size=1024,
        vocab_size=8192,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        initializer_range=0.05,
    ),
}
NEW = 48
DEV = "cuda" if torch.cuda.is_available() else "cpu"  # the CPU only smoke-tests this script
LENGTHS = [5, 17, 64, 100, 250, 511, 16, 33]


def reference(model, prompts: list[list[int]]) -> list[list[int]]:
    gen = GenerationConfig(
        max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    outs = []
    with torch.inference_mode():
        for p in prompts:
            x = torch.tensor([p], device=DEV)
            y = model.generate(x, attention_mask=torch.ones_like(x), generation_config=gen)
            outs.append(y[0, len(p) :].tolist())
    return outs


def agreement(got: list[list[int]], ref: list[list[int]]) -> tuple[int, float]:
    """(exact generations, share of tokens before each generation's first difference)."""
    exact, before = 0, 0
    for g, r in zip(got, ref):
        n = next((i for i, (a, b) in enumerate(zip(g, r)) if a != b), len(r))
        exact += n == len(r)
        before += n
    return exact, before / (len(ref) * NEW)


def main() -> int:
    rng = random.Random(0)
    rows, failed = [], False
    for name, shape in MODELS.items():
        cfg = dict(shape)
        config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
        config.eos_token_id = None
        prompts = [[rng.randrange(10, config.vocab_size) for _ in range(n)] for n in LENGTHS]
        prompts[6] = prompts[5][:300] + prompts[6]  # shares 300 tokens with prompt 5
        for dtype in (torch.float32, torch.bfloat16):
            torch.manual_seed(0)
            with torch.device(DEV):
                hf = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
            ref = reference(hf, prompts)
            state = dict(hf.state_dict())
            tmp = Path(tempfile.mkdtemp())
            config.save_pretrained(tmp)
            loader.load_state_dict = lambda d, state=state: state
            loader.load_tokenizer = lambda d, v=config.vocab_size: word_tokenizer(v)
            params = SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True)
            dt = "float32" if dtype == torch.float32 else "bfloat16"
            for mode, eager in (("graphs", False), ("eager", True)):
                llm = LLM(
                    str(tmp),
                    dtype=dt,
                    num_blocks=1024,
                    max_num_seqs=16,
                    max_num_batched_tokens=96,
                    enforce_eager=eager,
                    attention_backend="triton" if DEV == "cuda" else "torch",
                    device=DEV,
                )
                runs = [("concurrent, chunked", llm.generate(prompts, params))]
                if not eager:
                    runs.append(("again, prefix cache", llm.generate(prompts, params)))
                for label, outs in runs:
                    got = [o.token_ids for o in outs]
                    exact, share = agreement(got, ref)
                    cached = sum(o.cached_tokens for o in outs)
                    rows.append((name, dt, f"{mode}: {label}", f"{exact}/{len(ref)}", f"{share:.0%}", cached))
                    failed |= dtype == torch.float32 and exact != len(ref)
                del llm
            del hf, state
            if DEV == "cuda":
                torch.cuda.empty_cache()

    device = torch.cuda.get_device_name() if DEV == "cuda" else "cpu"
    print(f"\nkvmesh greedy vs transformers generate() on {device}, {NEW} new tokens")
    print(f"{'model':16} {'dtype':9} {'engine run':34} {'exact':>6} {'before 1st diff':>16} {'cached':>7}")
    for r in rows:
        print(f"{r[0]:16} {r[1]:9} {r[2]:34} {r[3]:>6} {r[4]:>16} {r[5]:>7}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
