"""The fp8 KV cache (``--kv-cache-dtype fp8``, worker/attention/kv_quant.py).

- the Triton write kernel stores the bytes torch's conversion gives (scales, saturation,
  subnormals, padding slots);
- each Triton attention path (prefill, cached prefix, split-KV decode, mixed) over an fp8 cache
  against the torch backend over the same cache; the torch backend against a reference that
  dequantizes the whole cache and runs the 16-bit math; both near attention over the unquantized
  keys and values;
- the engine on the CPU: a tiny random model and the real SmolLM2 with an fp8 pool against the
  model-dtype pool (greedy agreement, KL), four times the blocks of the float32 pool, scales read
  from a checkpoint, prefix caching and preemption over fp8 blocks;
- with CUDA: the compiled kernels at Llama-3-8B's attention shape (bf16 queries), and an engine
  with CUDA graphs.

Without CUDA the kernels run in Triton's interpreter, set up as in test_triton_attention.py.
"""

from __future__ import annotations

import random

import pytest

torch = pytest.importorskip("torch")

from kernel_mode import CUDA, DELEGATE, run_in_interpreter  # noqa: E402 (before triton: see kernel_mode)

DEVICE = torch.device("cuda" if CUDA else "cpu")
kernel_case = pytest.mark.skipif(DELEGATE, reason="run by test_kernel_cases_in_interpreter_subprocess")
cuda_only = pytest.mark.skipif(not CUDA, reason="compiled kernels at real shapes need CUDA")

from kvmesh.worker.attention import get_backend, kv_quant  # noqa: E402
from kvmesh.worker.attention.metadata import AttentionMetadata  # noqa: E402
from kvmesh.worker.attention.torch_backend import TorchAttentionBackend  # noqa: E402
from kvmesh.worker.attention.triton_backend import TritonAttentionBackend  # noqa: E402
from kvmesh.worker.kernels import attention as attention_kernels  # noqa: E402
from kvmesh.worker.kernels import kv_cache as kv_cache_kernels  # noqa: E402

FP8 = torch.float8_e4m3fn
QUERY_DTYPE = torch.bfloat16 if CUDA else torch.float32


@pytest.mark.skipif(not DELEGATE, reason="the kernel cases run in this process")
def test_kernel_cases_in_interpreter_subprocess() -> None:
    run_in_interpreter(__file__, "-k", "not engine")


class Fp8Batch:
    """A paged fp8 cache holding several sequences of ``(cached, new)`` tokens, the keys and values
    it was quantized from, and queries for the new tokens. Slots no sequence owns hold NaN bytes."""

    def __init__(self, seqs, heads, kv_heads, head_dim, block_size, kv_scale=(0.02, 0.05), seed=0):
        gen = torch.Generator().manual_seed(seed)
        rng = random.Random(seed)
        seq_lens = [c + n for c, n in seqs]
        per_seq = [-(-s // block_size) for s in seq_lens]
        num_blocks = 1 + sum(per_seq) + 3
        ids = list(range(1, num_blocks))
        rng.shuffle(ids)
        tables = torch.zeros(len(seqs), max(per_seq), dtype=torch.int32)
        for b, nb in enumerate(per_seq):
            tables[b, :nb] = torch.tensor([ids.pop() for _ in range(nb)], dtype=torch.int32)
        shape = (num_blocks, block_size, kv_heads, head_dim)
        nan = torch.full(shape, 0x7F, dtype=torch.uint8)  # e4m3fn NaN
        self.k_cache, self.v_cache = nan.view(FP8), nan.clone().view(FP8)
        self.kv_scale = torch.tensor(kv_scale, dtype=torch.float32)
        total = sum(seq_lens)
        # Keys spread over the fp8 range at this scale, a few past it (saturated), some tiny ones.
        self.keys = torch.randn(total, kv_heads, head_dim, generator=gen) * 2.0
        self.values = torch.randn(total, kv_heads, head_dim, generator=gen)
        slots = [int(tables[b, t // block_size]) * block_size + t % block_size
                 for b, s in enumerate(seq_lens) for t in range(s)]  # fmt: skip
        TorchAttentionBackend().write_kv(
            self.keys, self.values, self.k_cache, self.v_cache, torch.tensor(slots), self.kv_scale
        )
        qsl = [0]
        for _, n in seqs:
            qsl.append(qsl[-1] + n)
        self.query = torch.randn(qsl[-1], heads, head_dim, generator=gen).to(QUERY_DTYPE)
        self.meta = AttentionMetadata(
            query_start_loc=torch.tensor(qsl, dtype=torch.int32),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
            block_tables=tables,
            slot_mapping=torch.full((qsl[-1],), -1, dtype=torch.int64),
            max_query_len=max(n for _, n in seqs),
            max_seq_len=max(seq_lens),
            query_start_loc_cpu=qsl,
            seq_lens_cpu=seq_lens,
        )
        self.slots = slots
        self.scale = head_dim**-0.5

    def on(self, device: torch.device) -> Fp8Batch:
        m = self.meta
        self.query, self.kv_scale = self.query.to(device), self.kv_scale.to(device)
        self.k_cache, self.v_cache = self.k_cache.to(device), self.v_cache.to(device)
        self.meta = AttentionMetadata(
            m.query_start_loc.to(device), m.seq_lens.to(device), m.block_tables.to(device),
            m.slot_mapping.to(device), m.max_query_len, m.max_seq_len,
            query_start_loc_cpu=m.query_start_loc_cpu, seq_lens_cpu=m.seq_lens_cpu,
        )  # fmt: skip
        return self

    def torch_fp8(self) -> torch.Tensor:
        """The torch backend over the fp8 cache, in float32 on the CPU."""
        cpu = self._cpu_meta()
        k, v, s = self.k_cache.cpu(), self.v_cache.cpu(), self.kv_scale.cpu()
        return TorchAttentionBackend().forward(self.query.float().cpu(), k, v, cpu, self.scale, s)

    def dequantized_reference(self) -> torch.Tensor:
        """The whole cache dequantized first, then the 16-bit (here float32) torch attention."""
        s = self.kv_scale.cpu()
        k = kv_quant.dequantize(self.k_cache.cpu(), s[0], torch.float32)
        v = kv_quant.dequantize(self.v_cache.cpu(), s[1], torch.float32)
        return TorchAttentionBackend().forward(self.query.float().cpu(), k, v, self._cpu_meta(), self.scale)

    def unquantized_reference(self) -> torch.Tensor:
        """Attention over the float32 keys and values the cache was quantized from."""
        k = torch.zeros(self.k_cache.shape, dtype=torch.float32)
        v = torch.zeros(self.v_cache.shape, dtype=torch.float32)
        TorchAttentionBackend().write_kv(self.keys, self.values, k, v, torch.tensor(self.slots))
        return TorchAttentionBackend().forward(self.query.float().cpu(), k, v, self._cpu_meta(), self.scale)

    def _cpu_meta(self) -> AttentionMetadata:
        m = self.meta
        return AttentionMetadata(
            m.query_start_loc.cpu(), m.seq_lens.cpu(), m.block_tables.cpu(), m.slot_mapping.cpu(),
            m.max_query_len, m.max_seq_len,
            query_start_loc_cpu=m.query_start_loc_cpu, seq_lens_cpu=m.seq_lens_cpu,
        )  # fmt: skip


def _triton(batch: Fp8Batch, num_splits: int | None = None) -> torch.Tensor:
    m = batch.meta
    out = torch.full_like(batch.query, float("nan"))
    attention_kernels.paged_attention(
        batch.query, batch.k_cache, batch.v_cache, m.query_start_loc, m.seq_lens, m.block_tables,
        m.max_query_len, m.max_seq_len, batch.scale, out=out, num_splits=num_splits,
        kv_scale=batch.kv_scale,
    )  # fmt: skip
    return out.float().cpu()


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(out).all(), "unwritten or NaN output rows"
    return ((out - ref).norm() / ref.norm()).item()


# Same fp8 cache, same dequantized values: only the float32 summation order differs (bf16 queries
# and probabilities on a GPU).
KERNEL_TOL = 1.5e-2 if CUDA else 1e-5
# e4m3 keeps 3 mantissa bits (relative step 1/8 to 1/16): attention over the quantized keys and
# values stays within a few percent of the float32 one.
QUANTIZATION_TOL = 0.06


def _case(seqs, heads=8, kv_heads=2, head_dim=32, block_size=16, num_splits=None, seed=0) -> None:
    batch = Fp8Batch(seqs, heads, kv_heads, head_dim, block_size, seed=seed)
    torch_out = batch.torch_fp8()
    # The torch backend reads the fp8 cache as the dequantized cache: the same numbers.
    assert torch.equal(torch_out, batch.dequantized_reference())
    assert _rel(torch_out, batch.unquantized_reference()) < QUANTIZATION_TOL
    rel = _rel(_triton(batch.on(DEVICE), num_splits), torch_out)
    assert rel < KERNEL_TOL, f"Triton vs torch over the fp8 cache: relative error {rel:.2e}"


@kernel_case
@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 4), (8, 2)])
def test_prefill_over_fp8_cache(heads, kv_heads) -> None:
    _case([(0, 37), (0, 16), (0, 5)], heads, kv_heads)


@kernel_case
@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 4), (14, 2)])
def test_cached_prefix_prefill_over_fp8_cache(heads, kv_heads) -> None:
    _case([(40, 9), (16, 16), (3, 30), (31, 2)], heads, kv_heads, block_size=8)


@kernel_case
@pytest.mark.parametrize("num_splits", [1, 3, 8])
def test_split_kv_decode_over_fp8_cache(num_splits) -> None:
    _case([(0, 1), (15, 1), (16, 1), (99, 1), (200, 1)], 8, 2, num_splits=num_splits)


@kernel_case
def test_mixed_step_over_fp8_cache() -> None:
    _case([(0, 20), (33, 1), (50, 12), (100, 1)], 8, 2, head_dim=24, num_splits=4, seed=1)


@kernel_case
def test_write_kv_kernel_stores_torch_bytes() -> None:
    """Saturation past +-448 * scale, subnormals, exact halves (ties to even), -0 and padding."""
    gen = torch.Generator().manual_seed(3)
    tokens, kv_heads, head_dim, block_size, num_blocks = 29, 2, 24, 8, 6
    scale = torch.tensor([0.25, 0.125])
    qkv = torch.randn(tokens, 4 * kv_heads, head_dim, generator=gen) * 20
    qkv[:4] *= torch.logspace(-5, -2, 4)[:, None, None]  # subnormal territory once divided
    qkv[4, :, :8] = torch.tensor([2000.0, -2000.0, 0.0, -0.0, 0.25 * 1.0625, 0.25 * 1.1875, 1e-9, 300.0])
    key, value = qkv[:, 2 * kv_heads : 3 * kv_heads], qkv[:, 3 * kv_heads :]  # strided views
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:tokens]
    slots[[5, 17]] = -1
    shape = (num_blocks, block_size, kv_heads, head_dim)
    ref_k = torch.full(shape, 0x7F, dtype=torch.uint8).view(FP8)  # NaN: never written
    ref_v = ref_k.clone()
    TorchAttentionBackend().write_kv(key, value, ref_k, ref_v, slots, scale)
    k_cache, v_cache = ref_k.clone().fill_(0.5).to(DEVICE), ref_v.clone().fill_(0.5).to(DEVICE)
    k_cache.view(torch.uint8).fill_(0x7F)
    v_cache.view(torch.uint8).fill_(0x7F)
    dev = [t.to(DEVICE) for t in (key.to(QUERY_DTYPE), value.to(QUERY_DTYPE), slots, scale)]
    kv_cache_kernels.write_kv(dev[0], dev[1], k_cache, v_cache, dev[2], dev[3])
    if CUDA:  # the torch side from the same bf16 inputs
        TorchAttentionBackend().write_kv(dev[0].cpu(), dev[1].cpu(), ref_k, ref_v, slots, scale)
    assert torch.equal(k_cache.view(torch.uint8).cpu(), ref_k.view(torch.uint8))
    assert torch.equal(v_cache.view(torch.uint8).cpu(), ref_v.view(torch.uint8))
    written = ref_k.view(torch.uint8) != 0x7F
    assert int(written.sum()) == (tokens - 2) * kv_heads * head_dim  # padding slots untouched
    back = ref_k.float()[written] * 0.25
    assert torch.isfinite(back).all() and back.abs().max() == 448 * 0.25  # saturated, not NaN


@kernel_case
def test_triton_backend_write_then_forward_over_fp8_cache() -> None:
    """The backend's two calls as the model makes them, with the layer's scales."""
    seqs = [(20, 4), (9, 1), (0, 7)]
    batch = Fp8Batch(seqs, 8, 2, 32, 8, seed=5)
    want = batch.torch_fp8()
    new = [(b, t) for b, (c, n) in enumerate(seqs) for t in range(c, c + n)]
    slots = torch.tensor([int(batch.meta.block_tables[b, t // 8]) * 8 + t % 8 for b, t in new])
    starts = [0]
    for c, n in seqs:
        starts.append(starts[-1] + c + n)
    rows = torch.tensor([starts[b] + t for b, t in new])
    batch.k_cache.view(torch.uint8).view(-1, 2, 32)[slots] = 0x7F  # erase the new tokens
    batch.v_cache.view(torch.uint8).view(-1, 2, 32)[slots] = 0x7F
    batch.on(DEVICE)
    backend = TritonAttentionBackend()
    backend.write_kv(
        batch.keys[rows].to(DEVICE), batch.values[rows].to(DEVICE), batch.k_cache, batch.v_cache,
        slots.to(DEVICE), batch.kv_scale,
    )  # fmt: skip
    out = backend.forward(batch.query, batch.k_cache, batch.v_cache, batch.meta, batch.scale, batch.kv_scale)
    assert _rel(out.float().cpu(), want) < KERNEL_TOL


def test_scales_are_required_exactly_for_an_fp8_cache() -> None:
    fp8_cache = torch.zeros(2, 4, 1, 8, dtype=FP8)
    f32_cache = torch.zeros(2, 4, 1, 8)
    key = torch.zeros(1, 1, 8)
    with pytest.raises(ValueError, match="needs kv_scale"):
        TorchAttentionBackend().write_kv(key, key, fp8_cache, fp8_cache.clone(), torch.tensor([0]))
    with pytest.raises(ValueError, match="fp8 only"):
        TorchAttentionBackend().write_kv(
            key, key, f32_cache, f32_cache.clone(), torch.tensor([0]), torch.ones(2)
        )


def test_flash_attn_refuses_fp8_and_auto_picks_triton() -> None:
    with pytest.raises(ValueError, match="cannot read an fp8 KV cache"):
        get_backend("flash_attn", torch.device("cuda"), "fp8")
    assert get_backend("auto", torch.device("cuda"), "fp8").name == "triton"
    assert get_backend("auto", torch.device("cpu"), "fp8").name == "torch"


def test_scales_from_checkpoint_names() -> None:
    state = {
        "model.layers.0.self_attn.k_scale": torch.tensor(0.5),  # llm-compressor: 0-dim float32
        "model.layers.0.self_attn.v_scale": torch.tensor([0.25]),
        "model.layers.1.self_attn.k_proj.k_scale": torch.tensor([2.0]),  # ModelOpt
        "model.layers.1.self_attn.v_proj.v_scale": torch.tensor([3.0], dtype=torch.bfloat16),
        "model.layers.2.self_attn.kv_scale": torch.tensor([0.125, 0.375]),  # one for both; per head
    }
    scales, source = kv_quant.scales_from_checkpoint(state, 4)
    assert scales.tolist() == [[0.5, 0.25], [2.0, 3.0], [0.375, 0.375], [1.0, 1.0]]
    assert "3 of 4 layers" in source
    assert kv_quant.scales_from_checkpoint({}, 2)[0].tolist() == [[1.0, 1.0]] * 2
    with pytest.raises(ValueError, match="positive"):
        kv_quant.scales_from_checkpoint(
            {"model.layers.0.self_attn.k_scale": torch.tensor(0.0),
             "model.layers.0.self_attn.v_scale": torch.tensor(1.0)}, 1,
        )  # fmt: skip


# --- real shapes, compiled (GPU) -------------------------------------------------------------

LLAMA_8B = (32, 8, 128)


@cuda_only
def test_real_shape_prefill_cached_prefix_and_decode_fp8() -> None:
    rng = random.Random(7)
    _case([(0, 2048)], *LLAMA_8B)
    _case([(1843, 205), (0, 700), (512, 512)], *LLAMA_8B, seed=1)
    decodes = [(rng.randint(1, 4000), 1) for _ in range(48)] + [(8191, 1)]
    for num_splits in (None, 1, 16):
        _case(decodes, *LLAMA_8B, num_splits=num_splits, seed=2)
    _case([(rng.randint(1, 2000), 1) for _ in range(100)] + [(0, 1000), (300, 257)], *LLAMA_8B, seed=3)


@cuda_only
def test_real_shape_write_kv_fp8_bytes() -> None:
    gen = torch.Generator().manual_seed(4)
    tokens, (_, kv_heads, head_dim) = 4096, LLAMA_8B
    key = (torch.randn(tokens, kv_heads, head_dim, generator=gen) * 3).to(torch.bfloat16)
    scale = torch.tensor([0.01, 0.02])
    slots = torch.randperm(512 * 16, generator=gen)[:tokens]
    ref_k = torch.zeros(512, 16, kv_heads, head_dim, dtype=FP8)
    ref_v = ref_k.clone()
    TorchAttentionBackend().write_kv(key, key, ref_k, ref_v, slots, scale)
    k, v = ref_k.clone().zero_().cuda(), ref_v.clone().zero_().cuda()
    kv_cache_kernels.write_kv(key.cuda(), key.cuda(), k, v, slots.cuda(), scale.cuda())
    assert torch.equal(k.view(torch.uint8).cpu(), ref_k.view(torch.uint8))
    assert torch.equal(v.view(torch.uint8).cpu(), ref_v.view(torch.uint8))


# --- the engine on the CPU -------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, smollm_dir):
    """A random-weight Llama (GQA, 3 layers) saved as a Hugging Face directory with SmolLM2's
    tokenizer; its model.safetensors also gets per-layer k/v scales, as llm-compressor names them,
    in a copy (``scaled``)."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(smollm_dir)
    torch.manual_seed(11)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        initializer_range=0.2, bos_token_id=1, eos_token_id=2, tie_word_embeddings=True,
    )  # fmt: skip
    path = tmp_path_factory.mktemp("tiny")
    LlamaForCausalLM(config).to(torch.float32).save_pretrained(path)
    tokenizer.save_pretrained(path)
    scaled = tmp_path_factory.mktemp("tiny_scaled")
    for f in path.iterdir():
        (scaled / f.name).write_bytes(f.read_bytes())
    tensors = load_file(scaled / "model.safetensors")
    for i, (k, v) in enumerate(SCALES):
        tensors[f"model.layers.{i}.self_attn.k_scale"] = torch.tensor(k)  # 0-dim float32
        tensors[f"model.layers.{i}.self_attn.v_scale"] = torch.tensor(v)
    save_file(tensors, scaled / "model.safetensors", metadata={"format": "pt"})
    return path, scaled


SCALES = [(0.5, 0.25), (0.25, 0.125), (1.0, 0.5)]
PROMPTS = ["Hello there, how are you today?", "Numbers: 3 1 4 1 5 9 2 6", "A", "The sea is"]


def _greedy(n: int):
    from kvmesh.worker import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)


def test_engine_fp8_tiny_model_quality_blocks_and_scales(tiny_dir) -> None:
    from kvmesh.worker import LLM
    from kvmesh.worker.engine.config import CPU_KV_CACHE_BYTES
    from kvmesh.worker.model.quant import quality

    plain, scaled = tiny_dir
    ref = LLM(str(plain))
    fp8 = LLM(str(plain), kv_cache_dtype="fp8")
    r, c = ref.engine.runner, fp8.engine.runner
    assert r.kv_cache.dtype == torch.float32 and c.kv_cache.dtype == FP8
    assert c.block_bytes * 4 == r.block_bytes
    # The same CPU budget holds four times the float32 blocks (twice a bf16 pool's).
    assert r.num_blocks == CPU_KV_CACHE_BYTES // r.block_bytes
    assert 4 * r.num_blocks <= c.num_blocks < 4 * r.num_blocks + 4
    assert c.kv_scales.tolist() == [[1.0, 1.0]] * 3
    prompts = [ref.tokenizer.encode(p) for p in PROMPTS]
    q = quality.compare(ref, fp8, prompts, new_tokens=16)
    print(f"tiny random model, fp8 KV vs float32: {q}")
    assert q.greedy_agreement >= TINY_AGREEMENT and q.mean_kl <= TINY_MEAN_KL

    with_scales = LLM(str(scaled), kv_cache_dtype="fp8")
    assert with_scales.engine.runner.kv_scales.tolist() == [list(s) for s in SCALES]
    layer = with_scales.engine.runner.model.layers[1].self_attn
    assert layer.kv_scale.tolist() == list(SCALES[1])
    q = quality.compare(ref, with_scales, prompts, new_tokens=16)
    print(f"tiny random model, fp8 KV with checkpoint scales vs float32: {q}")
    assert q.greedy_agreement >= TINY_AGREEMENT and q.mean_kl <= TINY_MEAN_KL
    # A 16-bit cache ignores a checkpoint's scales.
    assert LLM(str(scaled), num_blocks=64).engine.runner.kv_scales is None


def test_engine_fp8_prefix_caching_and_preemption(tiny_dir) -> None:
    from kvmesh.worker import LLM

    plain, _ = tiny_dir
    cold = LLM(str(plain), kv_cache_dtype="fp8", num_blocks=512, enable_prefix_caching=False)
    system = " ".join(f"Rule {i}: answer politely." for i in range(12))
    prompts = [cold.tokenizer.encode(system + q) for q in (" Question one?", " Question two, longer?")]
    want = [o.token_ids for o in cold.generate(prompts, _greedy(12))]

    warm = LLM(str(plain), kv_cache_dtype="fp8", num_blocks=512)
    assert warm.generate([prompts[0]], _greedy(12))[0].token_ids == want[0]
    second = warm.generate([prompts[1]], _greedy(12))[0]
    assert second.cached_tokens >= 48  # fp8 blocks served from the prefix cache
    assert second.token_ids == want[1]

    # 4 blocks of 16 tokens for four short prompts growing by 40 tokens each: every sequence fits
    # alone, not all at once, so running sequences are preempted and recomputed into fp8 blocks.
    short = [cold.tokenizer.encode(p) for p in PROMPTS]
    assert all(len(p) + 40 <= 4 * 16 for p in short)
    want = [o.token_ids for o in cold.generate(short, _greedy(40))]
    tiny = LLM(str(plain), kv_cache_dtype="fp8", num_blocks=4, enable_prefix_caching=False)
    assert [o.token_ids for o in tiny.generate(short, _greedy(40))] == want
    assert tiny.engine.stats.preemptions > 0


def test_engine_fp8_smollm2_quality() -> None:
    """The real SmolLM2-135M (float32 on the CPU): an fp8 KV cache against the float32 one on the
    first four of quality.PROMPTS (the full set's numbers are in docs/quantization.md)."""
    from kvmesh.worker import LLM
    from kvmesh.worker.model.quant import quality

    ref = LLM("default", num_blocks=256)
    fp8 = LLM("default", num_blocks=256, kv_cache_dtype="fp8")
    q = quality.compare(ref, fp8, quality.default_prompts(ref)[:4], new_tokens=16)
    print(f"SmolLM2, fp8 KV vs float32: {q}")
    assert q.greedy_agreement >= SMOLLM_AGREEMENT and q.mean_kl <= SMOLLM_MEAN_KL


# Measured (the prints above; docs/quantization.md): the tiny model 0.31 agreement and mean KL
# 0.016, SmolLM2 (4 prompts, 16 tokens) 0.61 and 0.0128. Deterministic on the CPU.
TINY_AGREEMENT, TINY_MEAN_KL = 0.25, 0.03
SMOLLM_AGREEMENT, SMOLLM_MEAN_KL = 0.45, 0.03


@cuda_only
def test_engine_fp8_cuda_graphs_match_eager() -> None:
    """SmolLM2 in bf16 with an fp8 pool: the CUDA-graph path gives the eager path's tokens (a
    graph's fixed split count may move a near-tie), a block takes half the bf16 bytes, and the
    output stays near the bf16 cache's."""
    from kvmesh.worker import LLM
    from kvmesh.worker.model.quant import quality

    bf16 = LLM("default", num_blocks=2048)
    graphs = LLM("default", num_blocks=2048, kv_cache_dtype="fp8")
    eager = LLM("default", num_blocks=2048, kv_cache_dtype="fp8", enforce_eager=True)
    runner = graphs.engine.runner
    assert runner.graphs is not None and runner.backend.name == "triton" and runner.kv_cache.dtype == FP8
    assert 2 * runner.block_bytes == bf16.engine.runner.block_bytes
    prompts = quality.default_prompts(bf16)
    a = [o.token_ids for o in graphs.generate(prompts, _greedy(32))]
    b = [o.token_ids for o in eager.generate(prompts, _greedy(32))]
    assert sum(x == y for x, y in zip(a, b)) >= len(prompts) - 2
    q = quality.compare(bf16, graphs, prompts, new_tokens=32)
    print(f"SmolLM2 bf16 on CUDA, fp8 KV vs bf16 KV: {q}")
    assert q.greedy_agreement >= 0.2 and q.mean_kl <= 0.15
