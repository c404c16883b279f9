"""Kernel micro-benchmark on one GPU: kvmesh's Triton kernels against their rooflines.

Prints one table: each kernel at Llama-3-8B attention shapes (32 heads, 8 KV heads,
head_dim 128, KV block 16, bf16), its median time, the bytes or FLOPs it must move
or do, and that as a fraction of the device's measured copy bandwidth or bf16
matmul rate (timed as CUDA-graph replays, so host launch cost is excluded).
Prefill is also set against torch's SDPA (FlashAttention-2 inside PyTorch) on
contiguous K/V. ``--sweep`` times a few tile configurations first.

    python bench/gpu_kernels.py [--sweep] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import random

import torch
import torch.nn.functional as F
import triton.testing

from kvmesh.worker.kernels import activation, attention, kv_cache, norm, rotary

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 32, 8, 128, 16
DT = torch.bfloat16
DEV = torch.device("cuda")


def bench(fn, reps: int = 50) -> float:
    """Median milliseconds of one call, replayed from a CUDA graph so that the host's
    launch cost (tens of microseconds per Triton launch) stays out of the kernel time."""
    return triton.testing.do_bench_cudagraph(fn, rep=reps, return_mode="median")


def measure_ceilings() -> tuple[float, float]:
    """Copy bandwidth (bytes read + written per second) and the bf16 matmul rate."""
    # Events around plain launches: these are long enough that launch cost does not matter.
    src = torch.randn(2 * 1024**3 // 2, dtype=DT, device=DEV)  # 2 GiB
    dst = torch.empty_like(src)
    t = triton.testing.do_bench(lambda: dst.copy_(src), return_mode="median") / 1e3
    bw = 2 * src.numel() * 2 / t
    a = torch.randn(8192, 8192, dtype=DT, device=DEV)
    b = torch.randn(8192, 8192, dtype=DT, device=DEV)
    t = triton.testing.do_bench(lambda: a @ b, return_mode="median") / 1e3
    return bw, 2 * 8192**3 / t


class PagedBatch:
    """Sequences ``(cached, new)`` in a shuffled paged pool; ``copies`` independent
    replicas rotate between calls so that timings do not run out of L2."""

    def __init__(self, seqs: list[tuple[int, int]], copies: int = 1) -> None:
        rng = random.Random(0)
        seq_lens = [c + n for c, n in seqs]
        per_seq = [(s + BLOCK - 1) // BLOCK for s in seq_lens]
        num_blocks = sum(per_seq) * copies + 1
        ids = list(range(1, num_blocks))
        rng.shuffle(ids)
        shape = (num_blocks, BLOCK, KV_HEADS, HEAD_DIM)
        self.k = torch.randn(shape, dtype=DT, device=DEV)
        self.v = torch.randn(shape, dtype=DT, device=DEV)
        self.tables = []
        for _ in range(copies):
            t = torch.zeros(len(seqs), max(per_seq), dtype=torch.int32)
            for b, nb in enumerate(per_seq):
                t[b, :nb] = torch.tensor([ids.pop() for _ in range(nb)])
            self.tables.append(t.to(DEV))
        qsl = [0]
        for _, n in seqs:
            qsl.append(qsl[-1] + n)
        self.qsl = torch.tensor(qsl, dtype=torch.int32, device=DEV)
        self.seq_lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEV)
        self.q = torch.randn(qsl[-1], HEADS, HEAD_DIM, dtype=DT, device=DEV)
        self.max_q, self.max_s = max(n for _, n in seqs), max(seq_lens)
        self.kv_tokens = sum(seq_lens)
        self.i = 0

    def run(self, num_splits: int | None = None) -> torch.Tensor:
        self.i = (self.i + 1) % len(self.tables)
        return attention.paged_attention(
            self.q,
            self.k,
            self.v,
            self.qsl,
            self.seq_lens,
            self.tables[self.i],
            self.max_q,
            self.max_s,
            HEAD_DIM**-0.5,
            num_splits=num_splits,
        )

    @property
    def kv_bytes(self) -> int:
        return self.kv_tokens * KV_HEADS * HEAD_DIM * 2 * 2


def attention_flops(seqs: list[tuple[int, int]]) -> float:
    # QK^T and PV over the causal triangle of the new rows (2 FLOPs per MAC, 2 matmuls).
    total = 0
    for cached, new in seqs:
        total += new * cached + new * (new + 1) / 2
    return 4 * HEADS * HEAD_DIM * total


def sweep(rows: list) -> None:
    decode = PagedBatch([(1023, 1)] * 64, copies=4)
    for block_n in (32, 64, 128):
        for warps in (2, 4, 8):
            for stages in (2, 3):
                attention.DECODE_CONFIG.update(BLOCK_N=block_n, num_warps=warps, num_stages=stages)
                t = bench(decode.run)
                rows.append(("sweep decode b64 ctx1k", f"N{block_n} w{warps} s{stages}", t * 1e3, "", ""))
    attention.DECODE_CONFIG.update(BLOCK_N=64, num_warps=4, num_stages=2)
    prefill = PagedBatch([(0, 2048)])
    for bm, bn, warps, stages in [
        (128, 64, 8, 2),
        (128, 64, 8, 3),
        (128, 128, 8, 2),
        (64, 64, 4, 2),
        (128, 32, 4, 2),
    ]:
        attention.PREFILL_CONFIG.update(BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages)
        try:
            t = bench(prefill.run)
        except Exception as e:  # e.g. out of shared memory for a config
            rows.append(
                ("sweep prefill 2k", f"M{bm} N{bn} w{warps} s{stages}", float("nan"), str(e)[:40], "")
            )
            continue
        rows.append(("sweep prefill 2k", f"M{bm} N{bn} w{warps} s{stages}", t * 1e3, "", ""))
    attention.PREFILL_CONFIG.update(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.manual_seed(0)
    bw, flops = measure_ceilings()
    rows: list[tuple] = []
    rows.append(("ceiling: copy", "2 GiB d2d", float("nan"), f"{bw / 1e12:.2f} TB/s", ""))
    rows.append(("ceiling: bf16 matmul", "8192^3", float("nan"), f"{flops / 1e12:.0f} TFLOP/s", ""))
    if args.sweep:
        sweep(rows)

    def mem_row(name, shape, ms, nbytes):
        rows.append(
            (
                name,
                shape,
                ms * 1e3,
                f"{nbytes / (ms / 1e3) / 1e12:.2f} TB/s",
                f"{nbytes / (ms / 1e3) / bw:.0%}",
            )
        )

    def flop_row(name, shape, ms, n):
        rows.append(
            (name, shape, ms * 1e3, f"{n / (ms / 1e3) / 1e12:.0f} TFLOP/s", f"{n / (ms / 1e3) / flops:.0%}")
        )

    for batch, ctx, copies in [(1, 2048, 64), (1, 8192, 16), (32, 1024, 8), (128, 768, 2), (256, 768, 1)]:
        pb = PagedBatch([(ctx - 1, 1)] * batch, copies=copies)
        for splits in (None, 1) if batch <= 32 else (None,):
            ms = bench(lambda pb=pb, s=splits: pb.run(s))
            n = splits or attention.num_kv_splits(batch, KV_HEADS, ctx, DEV)
            mem_row("decode attention", f"B{batch} ctx{ctx} splits={n}", ms, pb.kv_bytes)
        del pb

    for seqs, label in [
        ([(0, 2048)], "2k cold"),
        ([(1843, 205)], "2k, 90% cached"),
        ([(0, 512)] * 16, "16x512"),
    ]:
        pb = PagedBatch(seqs)
        ms = bench(pb.run)
        flop_row("prefill attention", label, ms, attention_flops(seqs))
        if label == "2k cold":
            q = pb.q.view(1, 2048, HEADS, HEAD_DIM).transpose(1, 2)
            k = torch.randn(1, KV_HEADS, 2048, HEAD_DIM, dtype=DT, device=DEV)
            v = torch.randn_like(k)
            ms = bench(
                lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            )
            flop_row("  torch SDPA (contiguous K/V)", label, ms, attention_flops(seqs))
        del pb

    mixed = PagedBatch([(767, 1)] * 200 + [(0, 2048)])
    ms = bench(mixed.run)
    rows.append(("mixed attention", "200 decodes ctx768 + 2k prefill", ms * 1e3, "", ""))

    tokens = 16384
    key = torch.randn(tokens, KV_HEADS, HEAD_DIM, dtype=DT, device=DEV)
    kc = torch.empty(tokens // BLOCK + 1, BLOCK, KV_HEADS, HEAD_DIM, dtype=DT, device=DEV)
    vc = torch.empty_like(kc)
    slots = torch.randperm(tokens, device=DEV)
    ms = bench(lambda: kv_cache.write_kv(key, key, kc, vc, slots))
    mem_row("write_kv", f"T={tokens}", ms, 2 * 2 * key.numel() * 2)

    x = torch.randn(tokens, 4096, dtype=DT, device=DEV)
    res = torch.randn_like(x)
    w = torch.randn(4096, dtype=DT, device=DEV)
    ms = bench(lambda: norm.rms_norm(x, w, 1e-5, residual=res))
    mem_row("rms_norm + residual", "16384x4096", ms, 4 * x.numel() * 2)
    gu = torch.randn(4096, 2 * 14336, dtype=DT, device=DEV)
    ms = bench(lambda: activation.silu_and_mul(gu))
    mem_row("silu_and_mul", "4096x(2x14336)", ms, gu.numel() * 2 * 3 // 2)
    qkv = torch.randn(tokens, HEADS + 2 * KV_HEADS, HEAD_DIM, dtype=DT, device=DEV)
    inv = 1.0 / (500000 ** (torch.arange(0, HEAD_DIM, 2, device=DEV).float() / HEAD_DIM))
    cs = rotary.cos_sin_cache(inv, 8192)
    pos = torch.randint(0, 8192, (tokens,), device=DEV)
    ms = bench(lambda: rotary.apply_rotary(pos, qkv[:, :HEADS], qkv[:, HEADS : HEADS + KV_HEADS], cs))
    mem_row("rope q+k", f"T={tokens}", ms, 2 * tokens * (HEADS + KV_HEADS) * HEAD_DIM * 2)

    name = torch.cuda.get_device_name()
    print(f"\nkvmesh Triton kernels on {name} (torch {torch.__version__}, bf16, Llama-3-8B attention shapes)")
    print(f"{'kernel':34} {'shape':34} {'median us':>10} {'achieved':>15} {'of ceiling':>10}")
    for r in rows:
        us = "" if r[2] != r[2] else f"{r[2]:.1f}"
        print(f"{r[0]:34} {r[1]:34} {us:>10} {r[3]:>15} {r[4]:>10}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": name, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
