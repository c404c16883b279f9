"""kvmesh's Triton attention kernels against the torch reference backend.

Without CUDA the kernels run through Triton's interpreter (``TRITON_INTERPRET=1``)
on CPU tensors at small shapes, so CI checks the kernels' logic; with CUDA the same
tests run compiled, plus the ``real_shape`` cases (Llama-3-8B and Qwen2.5-0.5B
attention shapes, bf16). Every case poisons the KV slots no sequence owns (and the
output) with NaN, so a read of an unwritten slot or an unwritten output shows up.
"""

from __future__ import annotations

import itertools
import random
import sys

import pytest

torch = pytest.importorskip("torch")

from kernel_mode import CUDA, DELEGATE, run_in_interpreter  # noqa: E402 (before triton: see kernel_mode)

DEVICE = torch.device("cuda" if CUDA else "cpu")
in_process = pytest.mark.skipif(DELEGATE, reason="run by test_cases_in_interpreter_subprocess")

from kvmesh.worker.attention.metadata import AttentionMetadata  # noqa: E402
from kvmesh.worker.attention.torch_backend import TorchAttentionBackend  # noqa: E402
from kvmesh.worker.attention.triton_backend import TritonAttentionBackend  # noqa: E402
from kvmesh.worker.kernels import activation, norm, rotary  # noqa: E402
from kvmesh.worker.kernels import attention as attention_kernels  # noqa: E402
from kvmesh.worker.kernels import kv_cache as kv_cache_kernels  # noqa: E402

DTYPES = [torch.bfloat16, torch.float16] if CUDA else [torch.float32]
real_shape = pytest.mark.skipif(not CUDA, reason="real shapes need CUDA")


@pytest.mark.skipif(not DELEGATE, reason="the cases run in this process")
def test_cases_in_interpreter_subprocess() -> None:
    run_in_interpreter(__file__)


@in_process
def test_interpreter_is_active_without_cuda() -> None:
    assert attention_kernels._interpreting() is (not CUDA)


class Batch:
    """A paged cache holding several sequences: ``(cached, new)`` tokens each."""

    def __init__(
        self,
        seqs: list[tuple[int, int]],
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        block_size: int,
        dtype: torch.dtype,
        seed: int = 0,
    ) -> None:
        gen = torch.Generator().manual_seed(seed)
        rng = random.Random(seed)
        self.seqs = seqs
        seq_lens = [c + n for c, n in seqs]
        blocks_per_seq = [(s + block_size - 1) // block_size for s in seq_lens]
        num_blocks = 1 + sum(blocks_per_seq) + 3  # block 0 and a few spares are never owned
        ids = list(range(1, num_blocks))
        rng.shuffle(ids)
        max_blocks = max(blocks_per_seq)
        tables = torch.zeros(len(seqs), max_blocks, dtype=torch.int32)
        for b, nb in enumerate(blocks_per_seq):
            tables[b, :nb] = torch.tensor([ids.pop() for _ in range(nb)], dtype=torch.int32)

        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        self.k_cache = torch.full(shape, float("nan"), dtype=dtype)
        self.v_cache = torch.full(shape, float("nan"), dtype=dtype)
        # Keys/values of every context token, written through the reference scatter.
        total = sum(seq_lens)
        keys = torch.randn(total, num_kv_heads, head_dim, generator=gen).to(dtype)
        values = torch.randn(total, num_kv_heads, head_dim, generator=gen).to(dtype)
        slots = []
        for b, s in enumerate(seq_lens):
            slots += [int(tables[b, t // block_size]) * block_size + t % block_size for t in range(s)]
        TorchAttentionBackend().write_kv(keys, values, self.k_cache, self.v_cache, torch.tensor(slots))

        q_lens = [n for _, n in seqs]
        qsl = [0]
        for n in q_lens:
            qsl.append(qsl[-1] + n)
        self.query = torch.randn(qsl[-1], num_heads, head_dim, generator=gen).to(dtype)
        self.meta = AttentionMetadata(
            query_start_loc=torch.tensor(qsl, dtype=torch.int32),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
            block_tables=tables,
            slot_mapping=torch.full((qsl[-1],), -1, dtype=torch.int64),
            max_query_len=max(q_lens),
            max_seq_len=max(seq_lens),
            query_start_loc_cpu=qsl,
            seq_lens_cpu=seq_lens,
        )
        self.scale = head_dim**-0.5

    def reference(self) -> torch.Tensor:
        """The torch backend in float32 (NaN-poisoned slots are sliced away there), on the CPU."""
        out = TorchAttentionBackend().forward(
            self.query.float(), self.k_cache.float(), self.v_cache.float(), self.meta, self.scale
        )
        return out.cpu()

    def on(self, device: torch.device) -> Batch:
        m = self.meta
        self.query = self.query.to(device)
        self.k_cache = self.k_cache.to(device)
        self.v_cache = self.v_cache.to(device)
        self.meta = AttentionMetadata(
            query_start_loc=m.query_start_loc.to(device),
            seq_lens=m.seq_lens.to(device),
            block_tables=m.block_tables.to(device),
            slot_mapping=m.slot_mapping.to(device),
            max_query_len=m.max_query_len,
            max_seq_len=m.max_seq_len,
            query_start_loc_cpu=m.query_start_loc_cpu,
            seq_lens_cpu=m.seq_lens_cpu,
        )
        return self


def _run_triton(batch: Batch, num_splits: int | None = None) -> torch.Tensor:
    m = batch.meta
    out = torch.full_like(batch.query, float("nan"))
    attention_kernels.paged_attention(
        batch.query,
        batch.k_cache,
        batch.v_cache,
        m.query_start_loc,
        m.seq_lens,
        m.block_tables,
        m.max_query_len,
        m.max_seq_len,
        batch.scale,
        out=out,
        num_splits=num_splits,
    )
    return out


def _check(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    out = out.float().cpu()
    assert torch.isfinite(out).all(), "unwritten or NaN output rows"
    rel = ((out - ref).norm() / ref.norm()).item()
    tol = 1e-5 if dtype == torch.float32 and not CUDA else (3e-3 if dtype == torch.float32 else 1.5e-2)
    assert rel < tol, f"relative error {rel:.2e} >= {tol:.0e}"


def _case(seqs, heads, kv_heads, head_dim, block_size, dtype, num_splits=None, seed=0) -> None:
    batch = Batch(seqs, heads, kv_heads, head_dim, block_size, dtype, seed).on(DEVICE)
    ref = batch.reference()
    out = _run_triton(batch, num_splits)
    _check(out, ref, dtype)


GQA = [(4, 4), (8, 2), (14, 2)]  # ratios 1, 4 and 7 (Qwen2.5-0.5B's)


@in_process
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("heads", "kv_heads"), GQA)
def test_prefill_without_cached_prefix(dtype, heads, kv_heads) -> None:
    _case([(0, 37), (0, 16), (0, 5)], heads, kv_heads, 32, 16, dtype)


@in_process
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("heads", "kv_heads"), GQA)
def test_prefill_with_cached_prefix(dtype, heads, kv_heads) -> None:
    _case([(40, 9), (16, 16), (3, 30), (31, 2)], heads, kv_heads, 32, 16, dtype)


@in_process
@pytest.mark.parametrize("block_size", [1, 8, 16, 32])
def test_block_boundaries(block_size) -> None:
    # Lengths straddling block and tile edges: 15/16/17, 31/32/33.
    seqs = [(15, 1), (16, 16), (17, 15), (0, 33), (31, 1), (32, 2)]
    _case(seqs, 8, 2, 32, block_size, DTYPES[0])


@in_process
@pytest.mark.parametrize("dtype", DTYPES)
def test_mixed_prefill_and_decode(dtype) -> None:
    seqs = [(0, 20), (33, 1), (7, 1), (50, 12), (100, 1), (0, 1)]
    _case(seqs, 8, 2, 32, 16, dtype)
    _case(seqs, 8, 2, 32, 16, dtype, num_splits=4, seed=1)


@in_process
@pytest.mark.parametrize("num_splits", [1, 2, 5, 8])
@pytest.mark.parametrize(("heads", "kv_heads"), GQA)
def test_decode_split_kv(num_splits, heads, kv_heads) -> None:
    # Short contexts leave some splits empty; long ones span many tiles per split.
    seqs = [(0, 1), (14, 1), (15, 1), (16, 1), (99, 1), (249, 1)]
    _case(seqs, heads, kv_heads, 32, 16, DTYPES[0], num_splits=num_splits)


@in_process
def test_head_dim_not_power_of_two() -> None:
    _case([(20, 5), (30, 1)], 4, 2, 24, 16, DTYPES[0])


@in_process
def test_default_split_choice_decode() -> None:
    seqs = [(300, 1), (5, 1)]
    splits = attention_kernels.num_kv_splits(2, 2, 301, DEVICE)
    assert 1 < splits <= attention_kernels.MAX_SPLITS
    _case(seqs, 8, 2, 32, 16, DTYPES[0])


@in_process
@pytest.mark.parametrize("dtype", DTYPES)
def test_write_kv_matches_reference(dtype) -> None:
    gen = torch.Generator().manual_seed(3)
    num_tokens, kv_heads, head_dim, block_size, num_blocks = 23, 2, 24, 8, 6
    # Strided views, as the model hands over slices of a fused QKV projection.
    qkv = torch.randn(num_tokens, 4 * kv_heads, head_dim, generator=gen).to(dtype)
    key, value = qkv[:, 2 * kv_heads : 3 * kv_heads], qkv[:, 3 * kv_heads :]
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slots[[3, 11]] = -1  # padding tokens: not written
    shape = (num_blocks, block_size, kv_heads, head_dim)
    ref_k, ref_v = torch.full(shape, 7.0, dtype=dtype), torch.full(shape, 7.0, dtype=dtype)
    TorchAttentionBackend().write_kv(key, value, ref_k, ref_v, slots)
    k_cache, v_cache = (
        torch.full(shape, 7.0, dtype=dtype, device=DEVICE),
        torch.full_like(ref_v, 7.0).to(DEVICE),
    )
    kv_cache_kernels.write_kv(key.to(DEVICE), value.to(DEVICE), k_cache, v_cache, slots.to(DEVICE))
    assert torch.equal(k_cache.cpu(), ref_k)
    assert torch.equal(v_cache.cpu(), ref_v)


@in_process
@pytest.mark.parametrize("seqs", [[(20, 4), (9, 1)], [(20, 4), (0, 9)], [(20, 1), (9, 1)]])
def test_backend_write_then_forward(seqs) -> None:
    """The backend's two calls as the model makes them: write this step's K/V, then attend
    (mixed, prefill-only and decode-only steps)."""
    dtype = DTYPES[0]
    batch = Batch(seqs, 8, 2, 32, 8, dtype, seed=5)
    ref = batch.reference()
    # Erase the new tokens' K/V from the cache and write them back through the backend.
    m = batch.meta
    slots, keys, values = [], [], []
    for b, (cached, new) in enumerate(batch.seqs):
        for t in range(cached, cached + new):
            block = int(m.block_tables[b, t // 8])
            keys.append(batch.k_cache[block, t % 8].clone())
            values.append(batch.v_cache[block, t % 8].clone())
            batch.k_cache[block, t % 8] = float("nan")
            batch.v_cache[block, t % 8] = float("nan")
            slots.append(block * 8 + t % 8)
    batch.on(DEVICE)
    backend = TritonAttentionBackend()
    backend.write_kv(
        torch.stack(keys).to(DEVICE),
        torch.stack(values).to(DEVICE),
        batch.k_cache,
        batch.v_cache,
        torch.tensor(slots, device=DEVICE),
    )
    _check(backend.forward(batch.query, batch.k_cache, batch.v_cache, batch.meta, batch.scale), ref, dtype)


# --- fused elementwise kernels (RMSNorm + residual, SiLU-and-mul, RoPE) ---------------------


def _rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Hugging Face's LlamaRMSNorm, rounding included.
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


@in_process
@pytest.mark.parametrize("hidden", [64, 96])
def test_rms_norm_with_and_without_residual(hidden) -> None:
    gen = torch.Generator().manual_seed(11)
    dtype = DTYPES[0]
    x = torch.randn(7, hidden, generator=gen).to(dtype)
    residual = torch.randn(7, hidden, generator=gen).to(dtype)
    weight = (1 + 0.1 * torch.randn(hidden, generator=gen)).to(dtype)
    out = norm.rms_norm(x.to(DEVICE), weight.to(DEVICE), 1e-6)
    torch.testing.assert_close(out.cpu(), _rms_norm_ref(x, weight, 1e-6))
    res = residual.clone().to(DEVICE)
    out = norm.rms_norm(x.to(DEVICE), weight.to(DEVICE), 1e-6, residual=res)
    summed = (x.float() + residual.float()).to(dtype)
    torch.testing.assert_close(res.cpu(), summed)
    torch.testing.assert_close(out.cpu(), _rms_norm_ref(summed, weight, 1e-6))


@in_process
def test_silu_and_mul() -> None:
    gen = torch.Generator().manual_seed(12)
    dtype = DTYPES[0]
    gate_up = torch.randn(5, 2 * 40, generator=gen).to(dtype)
    out = activation.silu_and_mul(gate_up.to(DEVICE))
    ref = torch.nn.functional.silu(gate_up[:, :40]) * gate_up[:, 40:]
    torch.testing.assert_close(out.cpu(), ref, rtol=2e-2 if CUDA else 1e-5, atol=2e-2 if CUDA else 1e-5)


@in_process
def test_rotary_matches_rotate_half() -> None:
    gen = torch.Generator().manual_seed(13)
    dtype = DTYPES[0]
    heads, kv_heads, head_dim, tokens = 6, 2, 32, 9
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    cos_sin = rotary.cos_sin_cache(inv_freq, 64)
    positions = torch.randint(0, 64, (tokens,), generator=gen)
    qkv = torch.randn(tokens, heads + 2 * kv_heads, head_dim, generator=gen).to(dtype)
    q, k = qkv[:, :heads], qkv[:, heads : heads + kv_heads]

    def rotate(x: torch.Tensor) -> torch.Tensor:
        cos = cos_sin[positions, : head_dim // 2].repeat(1, 2)[:, None, :]
        sin = cos_sin[positions, head_dim // 2 :].repeat(1, 2)[:, None, :]
        x1, x2 = x.float()[..., : head_dim // 2], x.float()[..., head_dim // 2 :]
        return (x.float() * cos + torch.cat([-x2, x1], -1) * sin).to(dtype)

    ref_q, ref_k = rotate(q), rotate(k)
    qkv_dev = qkv.to(DEVICE)
    rotary.apply_rotary(
        positions.to(DEVICE), qkv_dev[:, :heads], qkv_dev[:, heads : heads + kv_heads], cos_sin.to(DEVICE)
    )
    tol = {"rtol": 1e-2, "atol": 1e-2} if CUDA else {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(qkv_dev[:, :heads].cpu(), ref_q, **tol)
    torch.testing.assert_close(qkv_dev[:, heads : heads + kv_heads].cpu(), ref_k, **tol)
    torch.testing.assert_close(qkv_dev[:, heads + kv_heads :].cpu(), qkv[:, heads + kv_heads :])


# --- real shapes, GPU only -------------------------------------------------------------------

LLAMA_8B = (32, 8, 128)
QWEN_05B = (14, 2, 64)


@real_shape
@pytest.mark.parametrize("shape", [LLAMA_8B, QWEN_05B], ids=["llama8b", "qwen05b"])
def test_real_prefill_2k_cold_and_cached(shape) -> None:
    heads, kv_heads, head_dim = shape
    _case([(0, 2048)], heads, kv_heads, head_dim, 16, torch.bfloat16)
    _case([(1843, 205), (0, 700), (512, 512)], heads, kv_heads, head_dim, 16, torch.bfloat16, seed=1)


@real_shape
@pytest.mark.parametrize("shape", [LLAMA_8B, QWEN_05B], ids=["llama8b", "qwen05b"])
@pytest.mark.parametrize("num_splits", [None, 1, 16])
def test_real_decode(shape, num_splits) -> None:
    heads, kv_heads, head_dim = shape
    rng = random.Random(7)
    seqs = [(rng.randint(1, 4000), 1) for _ in range(48)] + [(8191, 1)]
    _case(seqs, heads, kv_heads, head_dim, 16, torch.bfloat16, num_splits=num_splits)


@real_shape
def test_real_mixed_batch() -> None:
    rng = random.Random(8)
    seqs = [(rng.randint(1, 2000), 1) for _ in range(100)] + [(0, 1000), (300, 257)]
    _case(seqs, *LLAMA_8B, 16, torch.bfloat16)


# --- CUDA graph bucket choice and the flash_attn backend's calls (no GPU needed) --------------


def test_graph_buckets_decode_and_small_prefill() -> None:
    from kvmesh.worker.engine.cuda_graphs import CudaGraphRunner, capture_sizes

    assert capture_sizes(256)[:5] == [1, 2, 4, 8, 16] and capture_sizes(256)[-1] == 256
    assert capture_sizes(100)[-1] == 100
    runner = CudaGraphRunner(None, None, 64, 1024, 16, torch.device("cpu"))

    def key(q_lens: list[int], seq_len: int = 100, width: int = 8):
        return runner._key(sum(q_lens), len(q_lens), max(q_lens), seq_len, width)

    assert key([1] * 3) == ("decode", 4)
    assert key([1] * 64) == ("decode", 64)
    assert key([1] * 65) is None  # above max_num_seqs: eager
    assert key([208]) == ("prefill", 224)  # a cached prompt's tail
    assert key([40] + [1] * 7) == ("prefill", 64)  # a chunk mixed with decodes
    assert key([1] * 63 + [600]) == ("mixed", 704)  # a chunk beside every decode
    assert key([3] * 64) == ("mixed", 192)  # speculative verification of 64 sequences
    assert key([1] * 7 + [600]) == ("prefill", 640)  # few sequences: the small grid
    assert key([1] * 64 + [5]) is None  # more sequences than max_num_seqs
    assert key([1100]) is None  # large prefill: eager, GPU-bound anyway
    assert key([1], seq_len=2048) is None  # beyond the captured context
    assert key([1], width=65) is None  # a block table wider than the captured one


@in_process
def test_flash_attn_backend_calls(monkeypatch) -> None:
    """The flash-attn 2 calls the backend makes (flash-attn itself is not installed here):
    a fake module answers with the reference attention for the paged arguments it receives."""
    import types

    calls = []

    def reference(q, k_cache, v_cache, cu_q, cu_k, block_table, scale):
        qsl, kl = cu_q.tolist(), cu_k.tolist()
        seq_lens = [b - a for a, b in itertools.pairwise(kl)]
        meta = AttentionMetadata(cu_q, torch.tensor(seq_lens, dtype=torch.int32), block_table, cu_q, 0, 0)
        meta.query_start_loc_cpu, meta.seq_lens_cpu = qsl, seq_lens
        return TorchAttentionBackend().forward(q, k_cache, v_cache, meta, scale)

    def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, **kw):
        calls.append(("varlen", kw))
        assert kw["causal"] is True and kw["block_table"] is not None
        return reference(q, k, v, cu_seqlens_q, cu_seqlens_k, kw["block_table"], kw["softmax_scale"])

    def flash_attn_with_kvcache(q, k_cache, v_cache, **kw):
        calls.append(("kvcache", kw))
        assert q.dim() == 4 and q.shape[1] == 1 and kw["causal"] is True
        cu_q = torch.arange(q.shape[0] + 1, dtype=torch.int32)
        cu_k = torch.nn.functional.pad(torch.cumsum(kw["cache_seqlens"], 0, dtype=torch.int32), (1, 0))
        out = reference(q[:, 0], k_cache, v_cache, cu_q, cu_k, kw["block_table"], kw["softmax_scale"])
        return out[:, None]

    fake = types.ModuleType("flash_attn")
    fake.flash_attn_varlen_func = flash_attn_varlen_func
    fake.flash_attn_with_kvcache = flash_attn_with_kvcache
    monkeypatch.setitem(sys.modules, "flash_attn", fake)
    monkeypatch.delitem(sys.modules, "kvmesh.worker.attention.flash_attn_backend", raising=False)
    from kvmesh.worker.attention.flash_attn_backend import FlashAttnBackend

    backend = FlashAttnBackend()
    dtype = DTYPES[0]
    for seqs, block_size, kind in (
        ([(300, 20), (40, 1)], 256, "varlen"),  # flash-attn 2 pages are multiples of 256
        ([(300, 1), (40, 1)], 256, "kvcache"),
        ([(30, 5), (9, 1)], 16, None),  # smaller blocks: the Triton kernels answer
    ):
        calls.clear()
        batch = Batch(seqs, 8, 2, 32, block_size, dtype, seed=9).on(DEVICE)
        out = backend.forward(batch.query, batch.k_cache, batch.v_cache, batch.meta, batch.scale)
        _check(out, batch.reference(), dtype)
        assert [c[0] for c in calls] == ([kind] if kind else [])


# --- CUDA graph runner's staging, with each graph replaced by an eager call ------------------


class _EagerGraphs(dict):
    """Stands in for captured graphs: replaying a key runs the function a capture would record."""

    def __init__(self, runner) -> None:
        super().__init__()
        self.runner = runner

    def __missing__(self, key):
        runner = self.runner

        class Graph:
            def replay(self) -> None:
                runner.outputs[key] = runner._forward(key)

        return Graph()


@in_process
@pytest.mark.parametrize("small_seqs", [8, 1])
def test_graph_runner_staging_matches_eager(small_seqs, monkeypatch) -> None:
    """Steps staged through the runner's pinned buffers (padding, stale rows from larger
    steps, the decode graphs' LM head and argmax, prefill rows that do not sample) give the
    logits of the plain eager forward over the same paged cache. With ``small_seqs`` 1 the
    steps of several sequences take the mixed graphs (every sequence slot) and the others the
    one-slot prefill graphs, alternating."""
    from transformers import LlamaConfig

    from kvmesh.worker.engine import cuda_graphs
    from kvmesh.worker.engine.cuda_graphs import CudaGraphRunner

    monkeypatch.setattr(cuda_graphs, "SMALL_SEQS", small_seqs)
    from kvmesh.worker.engine.model_runner import StepInputs
    from kvmesh.worker.model.layers import use_fused_kernels
    from kvmesh.worker.model.llama import LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=97,
        max_position_embeddings=256,
    )
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = LlamaForCausalLM(config, TritonAttentionBackend(), 256).eval()
    use_fused_kernels(model, True)  # as build_model chooses for the Triton backend on a GPU
    cache_eager = torch.zeros(2, 2, 32, 16, 2, 16, device=DEVICE)
    cache_graph = cache_eager.clone()
    runner = CudaGraphRunner(model, cache_graph, 8, 256, 16, DEVICE)
    runner.graphs = _EagerGraphs(runner)
    tables = {"a": [3, 7], "b": [5], "c": [1, 2, 4]}
    rng = random.Random(3)

    def step(chunks: list[tuple[str, int, int, bool]]) -> StepInputs:
        """chunks: (sequence, first position, tokens, samples)."""
        ids, pos, slots, qsl, lens, rows = [], [], [], [0], [], []
        for name, start, n, samples in chunks:
            ids += [rng.randrange(97) for _ in range(n)]
            pos += list(range(start, start + n))
            slots += [tables[name][p // 16] * 16 + p % 16 for p in range(start, start + n)]
            qsl.append(qsl[-1] + n)
            lens.append(start + n)
            if samples:
                rows.append(qsl[-1] - 1)
        seq_tables = [tables[c[0]] for c in chunks]
        return StepInputs(
            ids, pos, slots, qsl, lens, seq_tables, rows, [None] * len(rows),
            max(c[2] for c in chunks), max(lens), max(len(t) for t in seq_tables),
        )  # fmt: skip

    def eager(s: StepInputs) -> torch.Tensor:
        width = s.max_blocks
        meta = AttentionMetadata(
            query_start_loc=torch.tensor(s.query_start_loc, dtype=torch.int32, device=DEVICE),
            seq_lens=torch.tensor(s.seq_lens, dtype=torch.int32, device=DEVICE),
            block_tables=torch.tensor(
                [t + [0] * (width - len(t)) for t in s.block_tables], dtype=torch.int32, device=DEVICE
            ),
            slot_mapping=torch.tensor(s.slot_mapping, dtype=torch.int64, device=DEVICE),
            max_query_len=s.max_query_len,
            max_seq_len=s.max_seq_len,
        )
        ids = torch.tensor(s.input_ids, device=DEVICE)
        hidden = model(ids, torch.tensor(s.positions, device=DEVICE), cache_eager, meta)
        return model.compute_logits(hidden[torch.tensor(s.logits_rows, dtype=torch.long, device=DEVICE)])

    steps = [
        [("a", 0, 20, False), ("b", 0, 9, True)],  # prefill: a chunk that samples nothing
        [("a", 20, 5, True), ("c", 0, 33, True)],  # 38 tokens in the 64-token graph
        [("a", 25, 1, True), ("b", 9, 1, True), ("c", 33, 1, True)],  # decode, padded to 4
        [("b", 10, 1, True)],  # decode after a larger one: stale rows must not write
        [("c", 34, 1, False), ("a", 26, 1, True)],  # one row of two samples
        [("b", 11, 3, True)],  # one sequence's chunk after steps of several
    ]
    with torch.inference_mode():
        for chunks in steps:
            s = step(chunks)
            assert runner.can_run(s)
            want = eager(s)
            logits, greedy = runner.run(s)
            torch.testing.assert_close(logits, want, rtol=1e-4, atol=1e-4)
            if greedy is not None:
                assert greedy.tolist() == logits.argmax(-1).tolist()
        torch.testing.assert_close(cache_graph, cache_eager, rtol=1e-5, atol=1e-5)


@real_shape
def test_the_torch_backend_on_a_gpu_runs_no_triton_kernel_and_matches_the_triton_path():
    """``--attention-backend torch`` is the reference: its norms, activation and RoPE are torch ops
    too; the Triton path gives the same logits within bf16-free float32 rounding."""
    from transformers import LlamaConfig

    from kvmesh.worker.attention import AttentionMetadata, get_backend
    from kvmesh.worker.model.layers import RMSNorm, RotaryEmbedding, SiluAndMul
    from kvmesh.worker.model.llama import build_model

    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=97, max_position_embeddings=256,
    )  # fmt: skip
    models = {}
    for name in ("torch", "triton"):
        torch.manual_seed(0)
        model = build_model(config, get_backend(name, DEVICE), 256, DEVICE, torch.float32)
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.1)
        kinds = [m for m in model.modules() if isinstance(m, (RMSNorm, SiluAndMul, RotaryEmbedding))]
        assert {m.fused for m in kinds} == {name == "triton"}
        models[name] = model
    n = 12
    logits = {}
    for name, model in models.items():
        cache = torch.zeros(2, 2, 4, 16, 2, 16, device=DEVICE)
        meta = AttentionMetadata.whole_prompt(n, 16, DEVICE)
        ids = torch.arange(3, 3 + n, device=DEVICE)
        with torch.inference_mode():
            logits[name] = model.compute_logits(model(ids, torch.arange(n, device=DEVICE), cache, meta))
    torch.testing.assert_close(logits["torch"], logits["triton"], rtol=1e-4, atol=1e-4)
