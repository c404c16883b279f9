"""End-to-end engine benchmark on one GPU, next to transformers' generate() in the same run.

A random-weight model of a real shape (bf16) is built once with transformers; its
weights go both to ``generate()`` and to kvmesh's engine (no checkpoint on disk:
the loader is handed the state dict and a synthetic word-level tokenizer, since
prompts are random token ids). Prints one table: each figure, its baseline or
roofline (from the copy bandwidth and bf16 matmul rate measured at the start),
and the ratio.

    python bench/gpu_engine.py --shape llama3-8b --json out.json
    python bench/gpu_engine.py --shape qwen2.5-0.5b --hf-batches 1,256
    python bench/gpu_engine.py --shape tiny --device cpu      # smoke test of the script itself
    python bench/gpu_engine.py --hf-batches '' --batches '' --sharegpt-requests 0   # batch 1 and TTFT only
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, PreTrainedTokenizerFast

from kvmesh.worker import LLM, SamplingParams
from kvmesh.worker.model import loader

SHAPES = {
    "llama3-8b": dict(
        model_type="llama",
        hidden_size=4096,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=14336,
        vocab_size=128256,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    ),
    "qwen2.5-0.5b": dict(
        model_type="qwen2",
        hidden_size=896,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        intermediate_size=4864,
        vocab_size=151936,
        max_position_embeddings=32768,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
    ),
    "tiny": dict(
        model_type="llama",
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=512,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    ),
}


def word_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """Token i is the word ``t{i}``: enough for an engine fed token ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0")


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn):
    sync()
    t = time.perf_counter()
    out = fn()
    sync()
    return time.perf_counter() - t, out


class Bench:
    def __init__(self, args) -> None:
        self.args = args
        self.dev = torch.device(args.device)
        self.rng = random.Random(args.seed)
        cfg = dict(SHAPES[args.shape])
        self.config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
        self.config.eos_token_id = None  # random weights: every run goes to max_tokens
        self.vocab = self.config.vocab_size
        self.rows: list[tuple[str, str, str, str, str]] = []

    def prompt(self, n: int) -> list[int]:
        return [self.rng.randrange(10, self.vocab) for _ in range(n)]

    def row(self, metric: str, value: str, reference: str, ratio: str, note: str = "") -> None:
        self.rows.append((metric, value, reference, ratio, note))
        print(f"  {metric}: {value} | {reference} | {ratio} {note}", flush=True)

    # -- device ceilings -------------------------------------------------------------------
    def ceilings(self) -> None:
        if self.dev.type != "cuda":
            self.bw, self.flops = 1e11, 1e12
            return
        import triton.testing

        src = torch.randn(1 << 30, dtype=torch.bfloat16, device=self.dev)  # 2 GiB
        dst = torch.empty_like(src)
        ms = triton.testing.do_bench(lambda: dst.copy_(src), return_mode="median")
        self.bw = 4 * src.numel() / (ms / 1e3)
        a = torch.randn(8192, 8192, dtype=torch.bfloat16, device=self.dev)
        b = torch.randn_like(a)
        ms = triton.testing.do_bench(lambda: a @ b, return_mode="median")
        self.flops = 2 * 8192**3 / (ms / 1e3)
        self.row("copy bandwidth (read+write)", f"{self.bw / 1e12:.2f} TB/s", "", "")
        self.row("bf16 matmul 8192^3", f"{self.flops / 1e12:.0f} TFLOP/s", "", "")

    # -- transformers ----------------------------------------------------------------------
    def build_hf(self):
        torch.manual_seed(self.args.seed)
        dtype = torch.bfloat16 if self.dev.type == "cuda" else torch.float32
        with torch.device(self.dev):
            model = AutoModelForCausalLM.from_config(self.config, dtype=dtype)
        model.eval()
        self.params = sum(p.numel() for p in model.parameters())
        emb = model.get_input_embeddings().weight
        self.weight_bytes = self.params * emb.element_size()
        # A decode step reads every weight but the embedding table (one row of it).
        tied = self.config.tie_word_embeddings
        self.weight_bytes_read = self.weight_bytes - (0 if tied else emb.numel() * emb.element_size())
        self.matmul_params = self.params - emb.numel()  # weights in matmuls per token (lm_head included)
        n_kv, d = self.config.num_key_value_heads, self.config.hidden_size // self.config.num_attention_heads
        self.kv_bytes_per_token = 2 * self.config.num_hidden_layers * n_kv * d * emb.element_size()
        return model

    def hf_generate(self, model, batch: int, prompt_len: int, new: int) -> float:
        ids = torch.tensor([self.prompt(prompt_len) for _ in range(batch)], device=self.dev)
        gen = GenerationConfig(
            max_new_tokens=new, min_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0
        )
        with torch.inference_mode():
            t, out = timed(
                lambda: model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gen)
            )
        assert out.shape[1] == prompt_len + new
        return t

    def run_hf(self, model) -> dict[int, float]:
        self.hf_generate(model, 2, 16, 4)  # warm-up
        results = {}
        for batch in self.args.hf_batches:
            if batch == 1:
                t1 = self.hf_generate(model, 1, 128, 1)
                tn = self.hf_generate(model, 1, 128, 1 + self.args.hf_b1_tokens)
                results[1] = self.args.hf_b1_tokens / (tn - t1)
                self.row("transformers generate, batch 1 decode", f"{results[1]:.1f} tok/s", "", "")
            else:
                t = self.hf_generate(model, batch, 512, 256)
                results[batch] = batch * 256 / t
                self.row(
                    f"transformers generate, batch {batch}, 512+256",
                    f"{results[batch]:.0f} out tok/s",
                    "",
                    "",
                )
        return results

    # -- kvmesh ----------------------------------------------------------------------------
    def build_engine(self, hf_model) -> LLM:
        state = dict(hf_model.state_dict())
        tokenizer = word_tokenizer(self.vocab)
        tmp = Path(tempfile.mkdtemp(prefix="kvmesh-bench-"))
        self.config.save_pretrained(tmp)
        originals = loader.load_state_dict, loader.load_tokenizer
        loader.load_state_dict = lambda directory: state
        loader.load_tokenizer = lambda directory: tokenizer
        settings = dict(
            device=self.args.device,
            max_num_seqs=self.args.max_num_seqs,
            max_num_batched_tokens=self.args.max_num_batched_tokens,
            max_model_len=self.args.max_model_len,
            gpu_memory_utilization=self.args.gpu_memory_utilization,
            attention_backend=self.args.attention_backend,
            enforce_eager=self.args.enforce_eager,
        )
        if self.dev.type == "cuda":
            settings["dtype"] = "bfloat16"
        else:
            settings["num_blocks"] = 4096
        t, llm = timed(lambda: LLM(str(tmp), **settings))
        runner = llm.engine.runner
        self.row(
            "engine start (weights copied, KV profiled, graphs captured)",
            f"{t:.1f} s",
            f"{runner.num_blocks} KV blocks = {runner.num_blocks * runner.block_bytes / 2**30:.1f} GiB",
            "",
        )
        loader.load_state_dict, loader.load_tokenizer = originals
        return llm

    def generate(self, llm: LLM, prompts: list[list[int]], max_tokens) -> tuple[float, list]:
        if isinstance(max_tokens, int):
            max_tokens = [max_tokens] * len(prompts)
        params = [SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True) for m in max_tokens]
        return timed(lambda: llm.generate(prompts, params))

    def decode_roofline(self, batch: int, prompt_len: int, new: int) -> float:
        """Output tok/s if prefill ran at the matmul rate and each decode step at the copy bandwidth."""
        prefill = 2 * self.matmul_params * batch * prompt_len / self.flops
        decode = 0.0
        for i in range(new):
            ctx = prompt_len + i
            step_bytes = self.weight_bytes_read + batch * ctx * self.kv_bytes_per_token
            decode += max(step_bytes / self.bw, 2 * self.matmul_params * batch / self.flops)
        return batch * new / (prefill + decode)

    def run_engine(self, llm: LLM, hf: dict[int, float]) -> None:
        self.generate(llm, [self.prompt(64) for _ in range(8)], 8)  # warm-up
        for batch in self.args.batches:
            prompts = [self.prompt(512) for _ in range(batch)]
            t, outs = self.generate(llm, prompts, 256)
            assert all(len(o.token_ids) == 256 for o in outs)
            tput = batch * 256 / t
            roof = self.decode_roofline(batch, 512, 256)
            self.row(
                f"kvmesh offline, batch {batch}, 512+256",
                f"{tput:.0f} out tok/s",
                f"roofline {roof:.0f}",
                f"{tput / roof:.0%}",
            )
            if batch in hf:
                self.row(
                    f"  vs transformers, batch {batch}",
                    f"{tput / hf[batch]:.1f}x",
                    f"{hf[batch]:.0f} out tok/s",
                    "",
                )

        n = self.args.sharegpt_requests
        if n:
            self.sharegpt(llm, n)
        self.batch1_and_ttft(llm, hf)

    def sharegpt(self, llm: LLM, n: int) -> None:
        """A ShareGPT-like mix: log-normal lengths (median ~180 in, ~150 out), clipped."""
        ins = [min(max(int(self.rng.lognormvariate(5.2, 0.9)), 4), 1536) for _ in range(n)]
        outs_len = [min(max(int(self.rng.lognormvariate(5.0, 0.8)), 4), 768) for _ in range(n)]
        t, outs = self.generate(llm, [self.prompt(x) for x in ins], outs_len)
        total_out = sum(len(o.token_ids) for o in outs)
        self.row(
            f"kvmesh ShareGPT-like mix, {n} requests",
            f"{total_out / t:.0f} out tok/s",
            f"{(sum(ins) + total_out) / t:.0f} total tok/s",
            "",
            f"mean in {statistics.mean(ins):.0f}, out {statistics.mean(outs_len):.0f}",
        )

    def batch1_and_ttft(self, llm: LLM, hf: dict[int, float]) -> None:
        # Batch-1 decode: the time of 256 extra tokens.
        t1, _ = self.generate(llm, [self.prompt(128)], 1)
        tn, _ = self.generate(llm, [self.prompt(128)], 257)
        rate = 256 / (tn - t1)
        roof = self.bw / self.weight_bytes
        self.row(
            "kvmesh batch-1 decode",
            f"{rate:.1f} tok/s",
            f"roofline {roof:.0f} (all weights / copy BW)",
            f"{rate / roof:.0%}",
        )
        if 1 in hf:
            self.row("  vs transformers, batch 1", f"{rate / hf[1]:.1f}x", f"{hf[1]:.1f} tok/s", "")

        # TTFT of a 2k prompt, cold and with a 90% cached prefix (median of 3, fresh prompts each).
        cold, warm, cached_tokens = [], [], []
        for _ in range(3):
            t, _ = self.generate(llm, [self.prompt(2048)], 1)
            cold.append(t)
            prefix = self.prompt(1843)
            self.generate(llm, [prefix + self.prompt(205)], 1)
            t, out = self.generate(llm, [prefix + self.prompt(205)], 1)
            warm.append(t)
            cached_tokens.append(out[0].cached_tokens)
        c, w = statistics.median(cold), statistics.median(warm)
        attn = 4 * self.config.hidden_size * self.config.num_hidden_layers
        cold_floor = max(
            (2 * self.matmul_params * 2048 + attn * 2048 * 2048 / 2) / self.flops,
            self.weight_bytes_read / self.bw,
        )
        warm_floor = max(
            (2 * self.matmul_params * 205 + attn * 205 * 2048) / self.flops, self.weight_bytes_read / self.bw
        )
        self.row(
            "kvmesh TTFT 2k prompt, cold",
            f"{c * 1e3:.1f} ms",
            f"floor {cold_floor * 1e3:.1f} ms",
            f"{cold_floor / c:.0%}",
        )
        self.row(
            "kvmesh TTFT 2k prompt, 90% cached",
            f"{w * 1e3:.1f} ms",
            f"floor {warm_floor * 1e3:.1f} ms",
            f"{warm_floor / w:.0%}",
            f"cached tokens {cached_tokens}",
        )
        self.row("  cold / cached TTFT", f"{c / w:.1f}x", "goal >= 5x", "")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batches", default="32,128,256")
    ap.add_argument("--hf-batches", default="1,128", help="transformers generate() batches ('' for none)")
    ap.add_argument("--hf-b1-tokens", type=int, default=32)
    ap.add_argument("--sharegpt-requests", type=int, default=512)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=16384)
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    ap.add_argument("--attention-backend", default="auto")
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json")
    args = ap.parse_args()
    args.batches = [int(x) for x in args.batches.split(",") if x]
    args.hf_batches = [int(x) for x in args.hf_batches.split(",") if x]

    bench = Bench(args)
    print(f"# {' '.join(sys.argv)}", flush=True)
    bench.ceilings()
    hf_model = bench.build_hf()
    hf = bench.run_hf(hf_model)
    if bench.dev.type == "cuda":
        torch.cuda.empty_cache()
    llm = bench.build_engine(hf_model)
    del hf_model
    if bench.dev.type == "cuda":
        torch.cuda.empty_cache()
    bench.run_engine(llm, hf)

    device = torch.cuda.get_device_name() if bench.dev.type == "cuda" else "cpu"
    print(f"\nkvmesh engine vs transformers, {args.shape} shape, random weights, bf16, {device}")
    print(f"{'metric':58} {'value':>20} {'baseline / roofline':>42} {'ratio':>6}  note")
    for m, v, r, q, note in bench.rows:
        print(f"{m:58} {v:>20} {r:>42} {q:>6}  {note}")
    if args.json:
        Path(args.json).write_text(
            json.dumps({"argv": sys.argv, "device": device, "rows": bench.rows}, indent=1)
        )


if __name__ == "__main__":
    main()
