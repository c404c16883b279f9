"""Where a step's time goes: GPU work against host work, for the Llama-3-8B shape.

Builds the engine with random weights (no transformers model), then prints one table:
- a captured decode graph's GPU time at batch 1..256 (context 640) next to the
  per-step roofline (weights + KV bytes over the measured copy bandwidth);
- an eager prefill step (2k cold; 205 new tokens over 1843 cached): wall time
  against the summed GPU kernel time from torch.profiler, i.e. how host-bound it is;
- the host cost of one kernel launch (a Triton kernel of ours, a torch op).

    python bench/gpu_step_profile.py
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch
import triton.testing
from transformers import AutoConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_engine import SHAPES, word_tokenizer

from kvmesh.worker import LLM
from kvmesh.worker.attention import AttentionMetadata
from kvmesh.worker.kernels.norm import rms_norm
from kvmesh.worker.model import loader
from kvmesh.worker.model.llama import LlamaForCausalLM

CTX = 640


def gpu_kernel_ms(fn) -> float:
    """Summed device time of the kernels ``fn`` launches (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(e.device_time_total for e in prof.key_averages()) / 1e3


def wall_ms(fn, reps: int = 10) -> float:
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t) * 1e3)
    return sorted(times)[len(times) // 2]


def main() -> None:
    cfg = dict(SHAPES["llama3-8b"])
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    tmp = Path(tempfile.mkdtemp())
    config.save_pretrained(tmp)
    loader.load_state_dict = lambda d: {}
    loader.load_tokenizer = lambda d: word_tokenizer(config.vocab_size)
    # Parameters come uninitialized (build_model): fill them with small random values instead.
    LlamaForCausalLM.load_weights = lambda self, state: [
        torch.nn.init.normal_(p, std=0.02) for p in self.parameters()
    ]
    llm = LLM(str(tmp), dtype="bfloat16", max_num_seqs=256, max_num_batched_tokens=16384, max_model_len=4096)
    runner = llm.engine.runner
    dev = runner.device
    src = torch.randn(1 << 30, dtype=torch.bfloat16, device=dev)
    dst = torch.empty_like(src)
    bw = 4 * src.numel() / (triton.testing.do_bench(lambda: dst.copy_(src), return_mode="median") / 1e3)
    weight_bytes = sum(p.numel() * p.element_size() for p in runner.model.parameters())
    weight_read = weight_bytes - runner.model.embed_tokens.weight.numel() * 2
    kv_per_token = runner.block_bytes // runner.block_size
    rows = [("copy bandwidth", f"{bw / 1e12:.2f} TB/s", "", "")]

    g = runner.graphs
    blocks_per_seq = -(-CTX // runner.block_size)
    for batch in (1, 32, 128, 256):
        g.seq_lens[:batch] = CTX
        g.slot_mapping[:batch] = -1
        ids = torch.arange(batch * blocks_per_seq, dtype=torch.int32, device=dev).view(batch, blocks_per_seq)
        g.block_tables[:batch, :blocks_per_seq] = ids
        g.input_ids[:batch] = torch.randint(0, config.vocab_size, (batch,), device=dev)
        g.positions[:batch] = CTX - 1
        ms = triton.testing.do_bench(g.graphs[("decode", batch)].replay, return_mode="median")
        roof = (weight_read + batch * CTX * kv_per_token) / bw * 1e3
        rows.append(
            (
                f"decode graph replay, batch {batch}, ctx {CTX}",
                f"{ms:.3f} ms",
                f"{roof:.3f} ms",
                f"{roof / ms:.0%}",
            )
        )
        if batch == 1:
            meta = g._meta(("decode", 1))
            eager = wall_ms(
                lambda meta=meta: runner.model(g.input_ids[:1], g.positions[:1], runner.kv_cache, meta)
            )
            rows.append(("decode eager forward, batch 1 (wall)", f"{eager:.3f} ms", "", ""))

    def prefill_step(cached: int, new: int):
        n = cached + new
        nb = -(-n // runner.block_size)
        table = torch.arange(nb, dtype=torch.int32, device=dev)[None]
        pos = torch.arange(cached, n, device=dev)
        slots = (
            table[0, pos // runner.block_size].long() * runner.block_size + pos % runner.block_size
        ).long()
        meta = AttentionMetadata(
            query_start_loc=torch.tensor([0, new], dtype=torch.int32, device=dev),
            seq_lens=torch.tensor([n], dtype=torch.int32, device=dev),
            block_tables=table,
            slot_mapping=slots,
            max_query_len=new,
            max_seq_len=n,
            query_start_loc_cpu=[0, new],
            seq_lens_cpu=[n],
        )
        ids = torch.randint(0, config.vocab_size, (new,), device=dev)

        def step():
            with torch.inference_mode():
                hidden = runner.model(ids, pos, runner.kv_cache, meta)
                runner.model.compute_logits(hidden[-1:])

        return step

    for cached, new, label in ((0, 2048, "2k cold"), (1843, 205, "205 new over 1843 cached")):
        step = prefill_step(cached, new)
        step()
        wall = wall_ms(step)
        busy = gpu_kernel_ms(step)
        rows.append(
            (
                f"eager prefill step, {label}",
                f"{wall:.2f} ms wall",
                f"{busy:.2f} ms GPU busy",
                f"{busy / wall:.0%}",
            )
        )

    x = torch.randn(1, 4096, dtype=torch.bfloat16, device=dev)
    w = torch.ones(4096, dtype=torch.bfloat16, device=dev)
    rms_norm(x, w, 1e-5)
    for label, fn in (("our Triton rms_norm", lambda: rms_norm(x, w, 1e-5)), ("torch.add", lambda: x + x)):
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(2000):
            fn()
        torch.cuda.synchronize()
        rows.append(
            (f"host cost of one launch: {label}", f"{(time.perf_counter() - t) / 2000 * 1e6:.1f} us", "", "")
        )

    print(f"\nkvmesh step profile, llama3-8b shape, bf16, {torch.cuda.get_device_name()}")
    print(f"{'measurement':48} {'value':>16} {'roofline / GPU':>18} {'ratio':>6}")
    for r in rows:
        print(f"{r[0]:48} {r[1]:>16} {r[2]:>18} {r[3]:>6}")


if __name__ == "__main__":
    main()
