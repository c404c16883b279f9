"""GGUF blocks served as the file holds them (kvmesh.worker.model.quant.gguf, kernels/gguf.py).

- ``dequantize`` against the gguf package's own ``gguf.quants.dequantize``, bit for bit, on blocks
  made by ``gguf.quants.quantize`` (Q4_0, Q4_1, Q8_0) or random bytes with finite scales (Q4_K,
  Q6_K: gguf-py has no quantizer for them);
- the Triton kernel (decode and prefill paths) against dequantize-then-matmul: the interpreter on
  small shapes without CUDA, compiled with it (plus Llama-3-8B shapes in bf16);
- a small GGUF file written here as llama.cpp writes one (q/k rows permuted, q/k/v of different
  types) loaded under transformers' names against transformers' own GGUF dequantization;
- the real SmolLM2 file served with ``quantization="gguf"``: every linear layer equals the dense
  conversion's weights, and the same greedy tokens and close logits (on CUDA, under ``auto``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
gguf = pytest.importorskip("gguf")

from kernel_mode import CUDA, DELEGATE, run_in_interpreter  # noqa: E402 (before triton: see kernel_mode)

kernel_case = pytest.mark.skipif(DELEGATE, reason="run by test_kernel_cases_in_interpreter_subprocess")
cuda_only = pytest.mark.skipif(not CUDA, reason="needs CUDA")

from kvmesh.worker.kernels.gguf import DECODE_MAX_TOKENS, gguf_matmul  # noqa: E402
from kvmesh.worker.model.quant import QuantSpec, method_for, resolve  # noqa: E402
from kvmesh.worker.model.quant.gguf import (  # noqa: E402
    BLOCKS,
    dequantize,
)

T = gguf.GGMLQuantizationType
TYPES = [T.Q4_0, T.Q4_1, T.Q8_0, T.Q4_K, T.Q6_K]


SCALES = {T.Q4_0: [0], T.Q4_1: [0, 2], T.Q8_0: [0], T.Q4_K: [0, 2], T.Q6_K: [208]}  # f16 byte offsets


def make_blocks(qtype, rows: int, cols: int, seed: int = 0, quantize: bool = True) -> np.ndarray:
    """``uint8 [rows, bytes]``: a random weight quantized by gguf-py, or (``quantize=False``, and
    for the K types, which gguf-py cannot quantize) random bytes whose float16 scales are finite."""
    rng = np.random.default_rng(seed)
    if quantize and qtype in (T.Q4_0, T.Q4_1, T.Q8_0):
        return gguf.quants.quantize(rng.standard_normal((rows, cols)).astype(np.float32) * 0.05, qtype)
    block, nbytes = BLOCKS[int(qtype)]
    raw = rng.integers(0, 256, (rows * cols // block, nbytes), dtype=np.uint8)
    for at in SCALES[qtype]:
        raw[:, at : at + 2] = (rng.random((raw.shape[0], 1)) * 1e-3).astype(np.float16).view(np.uint8)
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_dequantize_equals_gguf_quants_bit_for_bit(qtype) -> None:
    blocks = make_blocks(qtype, 12, 512, seed=int(qtype))
    reference = gguf.quants.dequantize(blocks, qtype)
    got = dequantize(torch.from_numpy(blocks), int(qtype))
    assert got.dtype == torch.float32 and got.shape == (12, 512)
    assert np.array_equal(got.numpy().view(np.int32), reference.view(np.int32))


def test_an_unsupported_block_type_is_a_clear_error() -> None:
    blocks = torch.zeros(2, 176, dtype=torch.uint8)  # two Q5_K blocks
    with pytest.raises(ValueError, match=r"GGUF block type Q5_K is not supported \(supported: Q4_0, Q4_1"):
        dequantize(blocks, int(T.Q5_K))
    with pytest.raises(ValueError, match="no GGUF kernel for block type"):
        gguf_matmul(torch.zeros(1, 256), blocks, int(T.Q5_K))


def test_a_missing_file_or_a_model_without_one_is_a_clear_error(tmp_path) -> None:
    method = method_for(QuantSpec("gguf", {"file": str(tmp_path / "gone.gguf")}))
    with pytest.raises(ValueError, match=r"the GGUF file .*gone.gguf does not exist"):
        method.file  # noqa: B018 (opened on first use: when the first layer is built)
    with pytest.raises(ValueError, match=r"--quantization gguf needs a \.gguf model"):
        resolve("gguf", object(), gguf_file=None, device=torch.device("cpu"))


def test_auto_expands_a_gguf_file_and_gguf_serves_its_blocks() -> None:
    for device in ("cuda", "cpu"):  # auto expands until the kernel has run compiled on a GPU
        assert resolve("auto", object(), gguf_file="/m/x.gguf", device=torch.device(device)) is None
    spec = resolve("gguf", object(), gguf_file="/m/x.gguf", device=torch.device("cuda"))
    assert spec.method == "gguf" and spec.params == {"file": "/m/x.gguf"}
    assert resolve("gguf", object(), gguf_file="/m/x.gguf", device=torch.device("cpu")).method == "gguf"


# ----- the kernel ---------------------------------------------------------------------------


@pytest.mark.skipif(not DELEGATE, reason="the cases run in this process")
def test_kernel_cases_in_interpreter_subprocess() -> None:
    run_in_interpreter(__file__, "-k", "kernel")


def _check_kernel(blocks: torch.Tensor, qtype, tokens: int, dtype, atol: float) -> None:
    rows, cols = blocks.shape[0], blocks.shape[1] // BLOCKS[int(qtype)][1] * BLOCKS[int(qtype)][0]
    gen = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, cols, generator=gen).to(dtype).to(blocks.device)
    reference = x.float() @ dequantize(blocks, int(qtype)).to(dtype).float().T  # on blocks' device
    got = gguf_matmul(x, blocks, int(qtype))
    assert got.dtype == dtype and got.shape == (tokens, rows)
    scale = reference.abs().max().clamp_min(1e-6)
    err = float((got.float() - reference).abs().max() / scale)
    assert err < atol, f"{qtype.name} M={tokens} {rows}x{cols} {dtype}: relative error {err}"


@kernel_case
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("tokens", [1, 3, DECODE_MAX_TOKENS + 1, 37])  # decode path, then prefill
def test_kernel_matches_dequantize_then_matmul(qtype, tokens) -> None:
    cols = 256 if qtype in (T.Q4_K, T.Q6_K) else 96  # columns past the last full tile are masked
    if not CUDA:
        blocks = torch.from_numpy(make_blocks(qtype, 40, cols, seed=tokens))
        _check_kernel(blocks, qtype, tokens, torch.float32, 1e-5)
        return
    blocks = torch.from_numpy(make_blocks(qtype, 40, cols * 2, seed=tokens)).cuda()
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        _check_kernel(blocks, qtype, tokens, dtype, 2e-2)


@cuda_only
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_kernel_compiled_at_llama3_8b_shapes(qtype) -> None:
    for rows, cols in ((6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)):
        blocks = torch.from_numpy(make_blocks(qtype, rows, cols, quantize=False)).cuda()
        for tokens in (1, 4, 512):
            _check_kernel(blocks, qtype, tokens, torch.bfloat16, 2e-2)


# ----- a GGUF file written here, against transformers' dequantization -----------------------

TINY = {"hidden": 64, "heads": 4, "kv_heads": 2, "inter": 128, "layers": 2, "vocab": 96}


def _permute(rows: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py row order for q/k (rotary halves interleaved per head)."""
    return (
        rows.reshape(heads, 2, rows.shape[0] // heads // 2, *rows.shape[1:])
        .swapaxes(1, 2)
        .reshape(rows.shape)
    )


def write_tiny_gguf(path: Path, types: dict[str, object]) -> dict[str, np.ndarray]:
    """A 2-layer llama GGUF (types: GGUF tensor short name -> block type, else Q4_1); returns the
    tensors (name -> blocks) as written."""
    c = TINY
    head_dim = c["hidden"] // c["heads"]
    shapes = {"attn_q": (c["hidden"], c["hidden"]), "attn_k": (c["kv_heads"] * head_dim, c["hidden"]),
              "attn_v": (c["kv_heads"] * head_dim, c["hidden"]), "attn_output": (c["hidden"], c["hidden"]),
              "ffn_gate": (c["inter"], c["hidden"]), "ffn_up": (c["inter"], c["hidden"]),
              "ffn_down": (c["hidden"], c["inter"])}  # fmt: skip
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(c["layers"])
    writer.add_context_length(256)
    writer.add_embedding_length(c["hidden"])
    writer.add_feed_forward_length(c["inter"])
    writer.add_head_count(c["heads"])
    writer.add_head_count_kv(c["kv_heads"])
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(c["vocab"])
    rng = np.random.default_rng(7)
    written = {}
    writer.add_tensor("token_embd.weight", rng.standard_normal((c["vocab"], c["hidden"])).astype(np.float32))
    for i in range(c["layers"]):
        for short, (out_f, in_f) in shapes.items():
            dense = (rng.standard_normal((out_f, in_f)) * 0.1).astype(np.float32)
            if short in ("attn_q", "attn_k"):
                dense = _permute(dense, c["heads"] if short == "attn_q" else c["kv_heads"])
            qtype = types.get(f"blk.{i}.{short}", T.Q4_1)
            name = f"blk.{i}.{short}.weight"
            written[name] = gguf.quants.quantize(dense, qtype)
            writer.add_tensor(name, written[name], raw_dtype=qtype)
        for norm in ("attn_norm", "ffn_norm"):
            writer.add_tensor(f"blk.{i}.{norm}.weight", np.ones(c["hidden"], dtype=np.float32))
    writer.add_tensor("output_norm.weight", np.ones(c["hidden"], dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return written


def transformers_state(path: Path) -> dict[str, torch.Tensor]:
    """The dense state dict transformers' GGUF loader makes of ``path`` (what convert.py saves)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    assert config.num_key_value_heads == TINY["kv_heads"]
    return {k: v.contiguous() for k, v in model.state_dict().items()}


def build(config, method):
    from kvmesh.worker.attention import get_backend
    from kvmesh.worker.model.llama import build_model

    backend = get_backend("torch", torch.device("cpu"))
    return build_model(config, backend, 256, torch.device("cpu"), torch.float32, quant=method)


def test_a_gguf_file_loads_under_transformers_names_with_mixed_types_expanded(tmp_path, caplog) -> None:
    from transformers import AutoConfig

    path = tmp_path / "tiny.gguf"
    mixed = {"blk.1.attn_k": T.Q8_0, "blk.1.attn_v": T.Q4_0, "blk.0.ffn_down": T.Q8_0}
    write_tiny_gguf(path, mixed)
    state = transformers_state(path)
    config = AutoConfig.from_pretrained(tmp_path, gguf_file=path.name)
    method = method_for(QuantSpec("gguf", {"file": str(path)}))
    with caplog.at_level("INFO", logger="kvmesh.worker.model.quant.gguf"):
        model = build(config, method)
        model.load_weights(method.checkpoint_tensors(state))
    assert (
        "layers.1.self_attn.qkv_proj has parts of different types (q_proj Q4_1, k_proj Q8_0, v_proj Q4_0)"
        in caplog.text
    )
    assert model.layers[1].self_attn.qkv_proj.qtype is None  # expanded: a dense weight
    assert model.layers[0].mlp.down_proj.qtype == T.Q8_0
    assert model.layers[0].self_attn.qkv_proj.qweight.dtype == torch.uint8
    for i in range(TINY["layers"]):
        p = f"model.layers.{i}."
        layer = model.layers[i]
        expected = {
            "self_attn.qkv_proj": [state[f"{p}self_attn.{x}_proj.weight"] for x in "qkv"],
            "self_attn.o_proj": [state[f"{p}self_attn.o_proj.weight"]],
            "mlp.gate_up_proj": [state[f"{p}mlp.gate_proj.weight"], state[f"{p}mlp.up_proj.weight"]],
            "mlp.down_proj": [state[f"{p}mlp.down_proj.weight"]],
        }
        for name, parts in expected.items():
            module = layer.get_submodule(name)
            assert torch.equal(module.method.dequantize(module), torch.cat(parts)), f"layer {i} {name}"
    dense = build(config, None)
    dense.load_weights(state)
    x = torch.randn(5, TINY["hidden"])
    for a, b in zip(model.layers, dense.layers):
        torch.testing.assert_close(a.mlp(x), b.mlp(x), rtol=1e-5, atol=1e-5)
        qkv_a, qkv_b = a.self_attn.qkv_proj(x), b.self_attn.qkv_proj(x)
        torch.testing.assert_close(qkv_a, qkv_b, rtol=1e-5, atol=1e-5)


# ----- SmolLM2 ------------------------------------------------------------------------------

PROMPTS = ("The capital of France is", "def fibonacci(n):")


@pytest.fixture(scope="module")
def smollm_pair():
    from kvmesh.worker import LLM

    gguf_llm = LLM("default", quantization="gguf", device="cpu", num_blocks=32)
    dense_llm = LLM("default", quantization="none", device="cpu", num_blocks=32)
    return gguf_llm, dense_llm


def test_smollm2_layers_hold_the_files_blocks_equal_to_the_dense_conversion(smollm_pair) -> None:
    gguf_llm, dense_llm = smollm_pair
    model, dense = gguf_llm.engine.runner.model, dense_llm.engine.runner.model
    quantized = dict(model.named_parameters())
    assert all(quantized[f"layers.0.{n}.qweight"].dtype == torch.uint8 for n in
               ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"))  # fmt: skip
    for i in (0, 17, 29):
        for name in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"):
            module = model.layers[i].get_submodule(name)
            assert module.qtype == T.Q4_1
            expected = dense.layers[i].get_submodule(name).weight
            assert torch.equal(module.method.dequantize(module), expected), f"layer {i} {name}"
    blocks = sum(p.numel() for n, p in quantized.items() if n.endswith("qweight"))
    expanded = sum(
        p.numel() * 4 for n, p in dense.named_parameters() if n.startswith("layers.") and "proj" in n
    )
    assert blocks * 6 < expanded  # 5 bits a weight against 32


def test_smollm2_gguf_on_the_cpu_gives_the_dense_greedy_tokens_and_close_logits(smollm_pair) -> None:
    from kvmesh.worker import SamplingParams
    from kvmesh.worker.model.quant.quality import next_token_logits

    gguf_llm, dense_llm = smollm_pair
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    dense_out = dense_llm.generate(list(PROMPTS), params)
    for prompt, out in zip(PROMPTS, dense_out):
        tokens = gguf_llm.tokenizer.encode(prompt) + list(out.outputs[0].token_ids)
        candidate = next_token_logits(gguf_llm, tokens[:-1])  # one teacher-forced forward
        reference = next_token_logits(dense_llm, tokens[:-1])
        n = len(out.outputs[0].token_ids)
        assert candidate[-n:].argmax(-1).tolist() == list(out.outputs[0].token_ids)
        torch.testing.assert_close(candidate, reference, rtol=0, atol=2e-3)
    short = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)  # the engine's own steps
    assert (
        gguf_llm.generate(PROMPTS[0], short)[0].outputs[0].token_ids == dense_out[0].outputs[0].token_ids[:2]
    )


@cuda_only
def test_smollm2_on_cuda_serves_the_blocks() -> None:
    from kvmesh.worker import LLM, SamplingParams
    from kvmesh.worker.model.quant.quality import next_token_logits

    auto = LLM("default", quantization="gguf", device="cuda", dtype="float32", enforce_eager=False)
    dense = LLM("default", quantization="none", device="cuda", dtype="float32")
    assert auto.engine.runner.model.layers[0].mlp.down_proj.qtype == T.Q4_1
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    for a, b in zip(auto.generate(list(PROMPTS), params), dense.generate(list(PROMPTS), params)):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
    tokens = auto.tokenizer.encode(PROMPTS[0]) * 8
    torch.testing.assert_close(
        next_token_logits(auto, tokens), next_token_logits(dense, tokens), rtol=0, atol=2e-2
    )
