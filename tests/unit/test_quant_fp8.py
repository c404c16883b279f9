"""FP8 W8A8 (kvmesh.worker.model.quant.fp8) against references written here: the quantizer's error
bounds, the layer's product against dequantize-then-matmul, real FP8 checkpoints (compressed-tensors
per channel, per tensor with static input scales, HF ``fp8`` with 2-D block scales) written to a tmp
dir as the tools write them and served by ``kvmesh.worker.LLM``, a 16-bit checkpoint quantized at
load, the configurations refused, SmolLM2's quality, and (CUDA only) ``torch._scaled_mm`` against
the emulation."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from kernel_mode import CUDA, DELEGATE, run_in_interpreter
from safetensors.torch import save_file

from kvmesh.worker.model.quant import QuantLinear, QuantSpec
from kvmesh.worker.model.quant.fp8 import FP8, Fp8LinearMethod, Fp8Scheme, quantize_rows, quantize_static

FP8_MAX = 448.0
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")  # fmt: skip
AT_LOAD = QuantSpec("fp8", {"weight": "channel", "activation": "dynamic"}, from_checkpoint=False)


# -- references, written independently of fp8.py --------------------------------------------------


def ref_quantize(x: torch.Tensor, scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 values and float32 scales: per row (largest magnitude -> 448) unless ``scale`` is given."""
    x = x.float()
    if scale is None:
        scale = torch.clamp(x.abs().max(dim=1, keepdim=True).values, min=1e-12) / FP8_MAX
    return torch.clamp(x / scale, -FP8_MAX, FP8_MAX).to(FP8), scale


def ref_product(x, weight_fp8, weight_scale, bias=None, input_scale=None) -> torch.Tensor:
    """Dequantize-then-matmul in float64: the FP8 activations and weights, exactly, then one product."""
    q, s = ref_quantize(x, input_scale)
    out = (q.double() * s.double()) @ (weight_fp8.double() * weight_scale.double().reshape(-1, 1)).t()
    return out if bias is None else out + bias.double()


def half_step(x: torch.Tensor) -> torch.Tensor:
    """The most per-row FP8 quantization moves each element of ``x`` (see the first test)."""
    scale = x.abs().amax(dim=1, keepdim=True) / FP8_MAX
    return torch.maximum(x.abs() / 16, scale * 2**-10)


def layer(in_features: int, out_features: int, weight: torch.Tensor, bias: bool = False) -> QuantLinear:
    method = Fp8LinearMethod(AT_LOAD)
    module = QuantLinear(in_features, out_features, bias, method)
    with torch.device("meta"):
        module.create_weights(torch.float32)
    module.to_empty(device=weight.device)
    with torch.no_grad():
        module.weight.copy_(weight)
        if bias:
            module.bias.normal_()
    method.process_after_loading(module)
    return module


# -- the quantizer and the product -----------------------------------------------------------------


def test_quantize_rows_error_is_within_half_an_fp8_step() -> None:
    """E4M3 keeps 3 mantissa bits: a value in the normal range is off by at most 1/16 of itself; below
    2^-6 (in units of the row's scale) the step is 2^-9, so at most 2^-10 of the scale."""
    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(64, 512, generator=gen) * torch.logspace(-4, 3, 64).reshape(-1, 1)
    rows[5] = 0.0  # an all-zero row
    rows[7, :3] = torch.tensor([1e-9, -3.0, 2.5])
    q, scale = quantize_rows(rows)
    assert q.dtype == FP8 and scale.dtype == torch.float32 and scale.shape == (64, 1)
    back = q.float() * scale
    assert torch.all((back - rows).abs() <= half_step(rows) * (1 + 1e-6))
    assert torch.all(back[5] == 0)
    # Each row's largest magnitude is exactly 448 steps of its scale: stored without rounding.
    idx = rows.abs().argmax(dim=1)
    top = rows.gather(1, idx[:, None])
    assert torch.allclose(back.gather(1, idx[:, None]), top, rtol=1e-6, atol=0)
    # The same numbers as the reference quantizer, bit for bit.
    ref_q, ref_s = ref_quantize(rows)
    assert torch.equal(q.view(torch.uint8), ref_q.view(torch.uint8)) and torch.equal(scale, ref_s)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("tokens", [1, 5, 33])
def test_apply_matches_dequantize_then_matmul(tokens: int, bias: bool) -> None:
    gen = torch.Generator().manual_seed(tokens)
    weight = torch.randn(96, 80, generator=gen) * torch.linspace(0.01, 1.0, 96).reshape(-1, 1)
    x = torch.randn(tokens, 80, generator=gen) * 3
    module = layer(80, 96, weight, bias)
    assert module.weight.dtype == FP8 and module.weight_scale.shape == (96,)
    ref_q, ref_s = ref_quantize(weight)  # quantized at load exactly as the reference does it
    assert torch.equal(module.weight.view(torch.uint8), ref_q.view(torch.uint8))
    assert torch.equal(module.weight_scale, ref_s.reshape(-1))
    out = module(x)
    assert out.dtype == x.dtype and out.shape == (tokens, 96)
    ref = ref_product(x, module.weight, module.weight_scale, module.bias)
    assert torch.allclose(out.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    # Against the dense product: each of x and W is off by at most half an FP8 step per element (see
    # above), so |x^W^ - xW| <= |x| eW + ex |W| + ex eW, summed over the inner dimension.
    dense = x @ weight.t() + (module.bias if bias else 0)
    ex, ew = half_step(x), half_step(weight)
    bound = (x.abs() @ ew.t() + ex @ weight.abs().t() + ex @ ew.t()) * (1 + 1e-4)
    assert torch.all((out - dense).abs() <= bound)
    # Typical, not worst, error: rounding errors of about 3% per operand (RMS), independent, add.
    assert (out - dense).norm() <= 0.06 * dense.norm()


def test_static_input_scale_is_used_as_given() -> None:
    spec = QuantSpec("fp8", compressed_tensors_config("tensor", static=True))
    method = Fp8LinearMethod(spec)
    assert method.suffixes == ("weight", "weight_scale", "input_scale")
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(32, 48, generator=gen)
    x = torch.randn(4, 48, generator=gen)
    module = QuantLinear(48, 32, False, method)
    with torch.device("meta"):
        module.create_weights(torch.float32)
    module.to_empty(device="cpu")
    wq, ws = ref_quantize(weight, weight.abs().max() / FP8_MAX)
    input_scale = x.abs().max() / FP8_MAX * 0.5  # half the range: the largest activations saturate
    with torch.no_grad():
        module.weight.copy_(wq)
        module.weight_scale.copy_(method.fuse("weight_scale", [ws.reshape(1)], [32]))
        module.input_scale.copy_(method.fuse("input_scale", [input_scale.reshape(())], [32]))
    method.process_after_loading(module)
    ref = ref_product(x, wq, ws.expand(32), input_scale=input_scale)
    assert torch.allclose(module(x).double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


@pytest.mark.skipif(DELEGATE, reason="run by test_quantize_kernel_in_interpreter_subprocess")
@pytest.mark.parametrize("rows,cols", [(1, 64), (5, 300), (3, 5000)])
def test_quantize_kernel_gives_the_emulations_bits(rows: int, cols: int) -> None:
    """The Triton per-token quantizer of the CUDA path against ``quantize_rows`` (the emulation's):
    the same scales bit for bit and the same FP8 values (a signed zero may differ), per token and
    with a static scale, with tiny and zero values among them."""
    from kvmesh.worker.kernels import fp8_quant

    device = "cuda" if CUDA else "cpu"
    gen = torch.Generator().manual_seed(cols)
    x = torch.randn(rows, cols, generator=gen) * torch.logspace(-6, 3, rows)[:, None]
    x[0, :4] = torch.tensor([0.0, 1e-30, -1e-9, 3.0])
    for dtype in [torch.float32, *([torch.bfloat16, torch.float16] if CUDA else [])]:
        xd = x.to(device=device, dtype=dtype)
        for static in (None, torch.tensor(0.01, device=device)):
            q, scale = fp8_quant.quantize_rows(xd, static)
            ref_q, ref_scale = quantize_rows(xd) if static is None else quantize_static(xd, static)
            assert torch.equal(scale, ref_scale) and scale.shape == (rows, 1)
            assert torch.equal(q.float(), ref_q.float())


@pytest.mark.skipif(not DELEGATE, reason="the kernel test runs in this process")
def test_quantize_kernel_in_interpreter_subprocess() -> None:
    run_in_interpreter(__file__, "-k", "quantize_kernel_gives")


# -- checkpoints -----------------------------------------------------------------------------------


def compressed_tensors_config(strategy: str = "channel", static: bool = False, **over) -> dict:
    inputs = (
        {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False, "symmetric": True}
        if static
        else {"num_bits": 8, "type": "float", "strategy": "token", "dynamic": True, "symmetric": True}
    )
    qc = {
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": {
                    "num_bits": 8,
                    "type": "float",
                    "strategy": strategy,
                    "dynamic": False,
                    "symmetric": True,
                    "group_size": None,
                    "observer": "minmax",
                },
                "input_activations": inputs,
                "output_activations": None,
            }
        },
        "ignore": ["lm_head"],
        "kv_cache_scheme": None,
    }
    qc.update(over)
    return qc


def tiny_dense(seed: int = 0):
    """A random Llama small enough for the CPU (every linear shape a multiple of 16)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        max_position_embeddings=256,
        initializer_range=0.1,
        tie_word_embeddings=False,
        torch_dtype="bfloat16",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    return config, {k: v.contiguous() for k, v in model.state_dict().items()}


def write_checkpoint(path: Path, config, tensors: dict, quantization_config: dict | None = None) -> Path:
    from kvmesh.worker.model import loader

    path.mkdir(parents=True)
    raw = config.to_dict()
    if quantization_config is not None:
        raw["quantization_config"] = quantization_config
    (path / "config.json").write_text(json.dumps(raw))
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    tokenizer_dir = loader.resolve_model("default").directory  # SmolLM2's; prompts here are token ids
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, path / name)
    return path


def is_linear(name: str) -> bool:
    return any(name.endswith(f"{n}.weight") for n in LINEARS)


def fp8_checkpoint(dense: dict, strategy: str, static: bool):
    """compressed-tensors tensors for ``dense`` (as llm-compressor writes them: F8_E4M3 ``weight``,
    ``weight_scale`` [out, 1] per channel or one number per tensor, in the model's dtype, and
    ``input_scale`` when static), and the dense state of their dequantized weights."""
    tensors, dequantized = {}, {}
    for name, value in dense.items():
        if not is_linear(name):
            tensors[name] = dequantized[name] = value
            continue
        prefix = name.removesuffix("weight")
        w = value.float()
        scale = w.abs().amax(dim=1, keepdim=True) if strategy == "channel" else w.abs().amax().reshape(1)
        scale = (scale / FP8_MAX).to(torch.bfloat16)  # stored in bf16; the division uses the stored value
        q = torch.clamp(w / scale.float(), -FP8_MAX, FP8_MAX).to(FP8)
        tensors[name], tensors[prefix + "weight_scale"] = q, scale
        if static:
            # Calibrated scales differ per layer; q, k and v's differ here too (fused: their largest).
            tensors[prefix + "input_scale"] = torch.tensor(
                [0.05 + 0.001 * len(tensors)], dtype=torch.bfloat16
            )
        dequantized[name] = q.float() * scale.float().reshape(-1, 1)
    return tensors, dequantized


def hf_block_checkpoint(dense: dict, block: int):
    """HF ``fp8`` tensors (``weight`` F8_E4M3 and float32 ``weight_scale_inv`` per block x block), and
    the dense state of their dequantized weights."""
    tensors, dequantized = {}, {}
    for name, value in dense.items():
        if not is_linear(name):
            tensors[name] = dequantized[name] = value
            continue
        w = value.float()
        out_f, in_f = w.shape
        tiles = w.reshape(out_f // block, block, in_f // block, block)
        scale_inv = tiles.abs().amax(dim=(1, 3)) / FP8_MAX
        q = torch.clamp(tiles / scale_inv[:, None, :, None], -FP8_MAX, FP8_MAX).to(FP8)
        tensors[name] = q.reshape(out_f, in_f)
        tensors[name.removesuffix("weight") + "weight_scale_inv"] = scale_inv
        dequantized[name] = (q.float() * scale_inv[:, None, :, None]).reshape(out_f, in_f)
    return tensors, dequantized


PROMPT = [7, 42, 199, 3, 88, 120, 5, 250, 64, 17, 33, 101]


def logits_of(llm, ids: list[int]) -> torch.Tensor:
    from kvmesh.worker.model.quant.quality import next_token_logits

    return next_token_logits(llm, ids)


def greedy(llm, n: int = 16) -> list[int]:
    from kvmesh.worker import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
    return list(llm.generate([{"prompt_token_ids": PROMPT}], params)[0].token_ids)


def assert_serves_like(candidate, reference, max_diff: float, rms_diff: float) -> None:
    """Teacher-forced logits over the prompt and the reference's 16 greedy tokens differ by at most
    ``max_diff`` (and ``rms_diff`` RMS); the candidate's greedy tokens equal the reference's up to the
    first position where the reference's top-two margin is below 2 x ``max_diff`` (from there on a
    flip is within the bound)."""
    ref_tokens = greedy(reference)
    sequence = PROMPT + ref_tokens[:-1]
    ref_logits, cand_logits = logits_of(reference, sequence), logits_of(candidate, sequence)
    diff = ref_logits - cand_logits
    assert diff.abs().max().item() <= max_diff, f"max logit difference {diff.abs().max().item():.4g}"
    assert diff.pow(2).mean().sqrt().item() <= rms_diff, (
        f"RMS logit difference {diff.pow(2).mean().sqrt():.4g}"
    )
    top2 = ref_logits[len(PROMPT) - 1 :].topk(2, dim=-1).values
    margins = (top2[:, 0] - top2[:, 1]).tolist()
    decided = next((i for i, m in enumerate(margins) if m < 2 * max_diff), len(margins))
    assert greedy(candidate)[:decided] == ref_tokens[:decided]


def fake_quantize_inputs(reference, input_scales: dict[str, torch.Tensor] | None = None) -> None:
    """Makes a dense model's decoder linear layers read their inputs as FP8 (``ref_quantize``: per
    token, or the given per-tensor scale of each module name), so it computes what an FP8 model of
    the same dequantized weights should, with the product left to ``nn.Linear``."""
    model = reference.engine.runner.model
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.startswith("layers."):
            scale = (input_scales or {}).get(name)

            def hook(_module, args, scale=scale):
                q, s = ref_quantize(args[0], scale)
                return ((q.float() * s).to(args[0].dtype),)

            module.register_forward_pre_hook(hook)


def assert_exactly_like(candidate, reference) -> None:
    """The FP8 model against ``fake_quantize_inputs``' reference: the same numbers up to float32
    rounding (1e-4 of the largest logit), and the same 16 greedy tokens."""
    ref_tokens = greedy(reference)
    sequence = PROMPT + ref_tokens[:-1]
    ref_logits, cand_logits = logits_of(reference, sequence), logits_of(candidate, sequence)
    assert (ref_logits - cand_logits).abs().max() <= 1e-4 * ref_logits.abs().max()
    assert greedy(candidate) == ref_tokens


def llm(path: Path, **settings):
    from kvmesh.worker import LLM

    return LLM(str(path), num_blocks=32, max_num_seqs=4, **settings)


@pytest.fixture(scope="module")
def tiny():
    return tiny_dense()


@pytest.mark.parametrize("strategy,static", [("channel", False), ("tensor", True)])
def test_compressed_tensors_checkpoint_serves_like_its_dequantized_weights(tiny, tmp_path, strategy, static):
    config, dense = tiny
    tensors, dequantized = fp8_checkpoint(dense, strategy, static)
    qc = compressed_tensors_config(strategy, static)
    fp8_dir = write_checkpoint(tmp_path / "fp8", config, tensors, qc)
    ref_dir = write_checkpoint(tmp_path / "ref", config, {k: v.float() for k, v in dequantized.items()})
    candidate, reference = llm(fp8_dir), llm(ref_dir)  # quantization auto: the checkpoint's own
    model = candidate.engine.runner.model
    qkv = model.layers[1].self_attn.qkv_proj
    assert (
        isinstance(qkv, QuantLinear)
        and qkv.weight.dtype == FP8
        and not isinstance(model.lm_head, QuantLinear)
    )
    # Fused q/k/v (each with its own per-tensor scale, when per tensor) hold every part's weight exactly.
    parts = [dequantized[f"model.layers.1.self_attn.{p}_proj.weight"] for p in "qkv"]
    assert torch.equal(qkv.method.dequantize(qkv), torch.cat(parts))
    down = model.layers[0].mlp.down_proj
    assert torch.equal(down.method.dequantize(down), dequantized["model.layers.0.mlp.down_proj.weight"])
    if static:  # fused parts' input scales join as their largest
        scales = [tensors[f"model.layers.1.mlp.{p}_proj.input_scale"].float() for p in ("gate", "up")]
        assert model.layers[1].mlp.gate_up_proj.input_scale.item() == max(s.item() for s in scales)
    # Activation rounding alone moves this random model's logits (std 0.77) by 0.31-0.36 at most and
    # 0.07 RMS (measured); the bounds leave room for seeds, not for a misplaced tensor.
    assert_serves_like(candidate, reference, max_diff=0.6, rms_diff=0.12)
    scales = None
    if static:
        scales = {}
        for i in range(config.num_hidden_layers):
            for module, parts in (("self_attn.qkv_proj", ("self_attn.q_proj", "self_attn.k_proj",
                                   "self_attn.v_proj")), ("self_attn.o_proj", ("self_attn.o_proj",)),
                                  ("mlp.gate_up_proj", ("mlp.gate_proj", "mlp.up_proj")),
                                  ("mlp.down_proj", ("mlp.down_proj",))):  # fmt: skip
                given = [tensors[f"model.layers.{i}.{p}.input_scale"].float() for p in parts]
                scales[f"layers.{i}.{module}"] = max(given, key=float)
    fake_quantize_inputs(reference, scales)
    assert_exactly_like(candidate, reference)


def test_hf_block_checkpoint_is_requantized_per_channel(tiny, tmp_path) -> None:
    config, dense = tiny
    tensors, dequantized = hf_block_checkpoint(dense, 32)
    qc = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3", "weight_block_size": [32, 32]}
    fp8_dir = write_checkpoint(tmp_path / "fp8", config, tensors, qc)
    ref_dir = write_checkpoint(tmp_path / "ref", config, {k: v.float() for k, v in dequantized.items()})
    candidate, reference = llm(fp8_dir), llm(ref_dir)
    for module in (m for m in candidate.engine.runner.model.modules() if isinstance(m, QuantLinear)):
        assert not hasattr(module, "weight_scale_inv") and module.weight_scale.shape == (module.out_features,)
    qkv = candidate.engine.runner.model.layers[0].self_attn.qkv_proj
    blocks = torch.cat([dequantized[f"model.layers.0.self_attn.{p}_proj.weight"] for p in "qkv"])
    # The second rounding (block scales -> one scale per row) moves a weight by at most half an FP8
    # step of its row's scale: 1/16 of itself, or 2^-10 of the row's scale below the normal range.
    row_scale = blocks.abs().amax(dim=1, keepdim=True) / FP8_MAX
    bound = torch.maximum(blocks.abs() / 16, row_scale * 2**-10) * (1 + 1e-6)
    assert torch.all((qkv.method.dequantize(qkv) - blocks).abs() <= bound)
    assert_serves_like(candidate, reference, max_diff=0.6, rms_diff=0.12)


def test_16_bit_checkpoint_is_quantized_at_load(tiny, tmp_path) -> None:
    config, dense = tiny
    path = write_checkpoint(tmp_path / "bf16", config, dense)
    candidate, reference = llm(path, quantization="fp8"), llm(path, quantization="none")
    model = candidate.engine.runner.model
    gate_up = model.layers[1].mlp.gate_up_proj
    joined = torch.cat([dense[f"model.layers.1.mlp.{p}_proj.weight"] for p in ("gate", "up")])
    ref_q, ref_s = ref_quantize(joined)  # per channel, from the checkpoint's own values
    assert torch.equal(gate_up.weight.view(torch.uint8), ref_q.view(torch.uint8))
    assert torch.equal(gate_up.weight_scale, ref_s.reshape(-1))
    names = {n for n, _ in model.named_parameters()}
    assert not any(n.endswith("input_scale") for n in names)
    # Both roundings now (the weights' too): measured 0.37 max, 0.08 RMS on logits of std 0.77.
    assert_serves_like(candidate, reference, max_diff=0.6, rms_diff=0.12)


def test_dummy_weights_are_quantized(tiny, tmp_path) -> None:
    config, dense = tiny
    path = write_checkpoint(tmp_path / "bf16", config, dense)
    served = llm(path, quantization="fp8", load_format="dummy")
    for module in (m for m in served.engine.runner.model.modules() if isinstance(m, QuantLinear)):
        assert module.weight.dtype == FP8 and module.weight_scale.dtype == torch.float32
    assert len(greedy(served, 4)) == 4


# -- refused configurations ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "qc,message",
    [
        (compressed_tensors_config(config_groups={}), "0 config_groups"),
        (compressed_tensors_config(format="pack-quantized"), "format 'pack-quantized'"),
        (compressed_tensors_config("group"), "strategy 'group'"),
        (compressed_tensors_config("block"), "strategy 'block'"),
        (compressed_tensors_config(ignore=["lm_head", "model.layers.0.mlp.down_proj"]), "leaves"),
        (compressed_tensors_config(ignore=["re:.*down_proj$"]), "leaves"),
        ({"quant_method": "fp8", "activation_scheme": "static", "weight_block_size": [128, 128]}, "block"),
        ({"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128]}, "rows, cols"),
    ],
)
def test_unserved_schemes_are_refused_in_one_line(qc: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        Fp8LinearMethod(QuantSpec("fp8", qc))
    assert "\n" not in str(info.value)


def test_refused_weight_and_activation_types() -> None:
    int8 = compressed_tensors_config()
    int8["config_groups"]["group_0"]["weights"].update(type="int")
    with pytest.raises(ValueError, match="8-bit float"):
        Fp8LinearMethod(QuantSpec("fp8", int8))
    per_tensor_dynamic = compressed_tensors_config()
    per_tensor_dynamic["config_groups"]["group_0"]["input_activations"].update(strategy="tensor")
    with pytest.raises(ValueError, match="dynamic per token or static per tensor"):
        Fp8LinearMethod(QuantSpec("fp8", per_tensor_dynamic))
    assert (
        Fp8Scheme.from_spec(QuantSpec("fp8", compressed_tensors_config(ignore=["re:.*lm_head"]))).weight
        == "channel"
    )


def test_a_bad_checkpoint_fails_the_engine_with_its_reason(tiny, tmp_path) -> None:
    config, dense = tiny
    tensors, _ = fp8_checkpoint(dense, "channel", False)
    qc = compressed_tensors_config("group")
    path = write_checkpoint(tmp_path / "fp8", config, tensors, qc)
    with pytest.raises(ValueError, match="strategy 'group'"):
        llm(path)
    good = write_checkpoint(tmp_path / "good", config, tensors, compressed_tensors_config())
    with pytest.raises(ValueError, match="fp8-quantized; --quantization gptq cannot serve it"):
        llm(good, quantization="gptq")
    with pytest.raises(ValueError, match="--quantization none cannot expand it"):
        llm(good, quantization="none")


# -- SmolLM2 ---------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.integration
def test_smollm2_quality_fp8_against_16_bit() -> None:
    """SmolLM2-135M-Instruct, float32 on the CPU (the emulation), fp8 quantized at load against
    ``none``, over quality.PROMPTS with 32 greedy tokens each. Numbers: docs/quantization.md."""
    from kvmesh.worker import LLM
    from kvmesh.worker.model.quant import quality

    reference = LLM("default", quantization="none", num_blocks=64)
    candidate = LLM("default", quantization="fp8", num_blocks=64)
    result = quality.compare(reference, candidate, quality.default_prompts(reference), new_tokens=32)
    # Measured: greedy agreement 0.371, mean KL 0.0864, max KL 0.662 over 568 positions (a 135M
    # model is sensitive: weight and activation rounding each cost about half of it).
    assert result.mean_kl < 0.12 and result.max_kl < 1.2
    assert result.greedy_agreement >= 0.25


# -- CUDA ------------------------------------------------------------------------------------------


@pytest.mark.skipif(
    not CUDA or torch.cuda.get_device_capability() < (8, 9), reason="FP8 matmul needs CUDA >= 8.9"
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tokens", [1, 3, 17, 256])
@pytest.mark.parametrize("shape", [(64, 96), (4096, 6144), (14336, 4096)])
def test_scaled_mm_matches_the_emulation(shape, tokens: int, dtype: torch.dtype) -> None:
    """The CUDA path (torch._scaled_mm, row-wise scales, bias fused) against the same layer's float32
    emulation: both read the same FP8 operands, so they differ by accumulation order and the
    16-bit output's rounding only."""
    in_features, out_features = shape
    gen = torch.Generator(device="cuda").manual_seed(tokens)
    weight = torch.randn(out_features, in_features, device="cuda", generator=gen).to(dtype) * 0.02
    module = layer(in_features, out_features, weight, bias=True)
    module.bias.data = module.bias.data.to(dtype)
    assert module.fp8_mm
    x = torch.randn(tokens, in_features, device="cuda", generator=gen).to(dtype)
    out = module(x)
    module.emulated_weight = module.method.dequantize(module)
    emulated = module.method.emulate(module, x)
    assert out.dtype == dtype and out.shape == (tokens, out_features)
    scale = emulated.float().abs().max().item()
    assert (out.float() - emulated.float()).abs().max().item() <= 1e-2 * scale
    ref = ref_product(x, module.weight, module.weight_scale, module.bias)
    assert torch.allclose(out.double(), ref, rtol=0, atol=1e-2 * scale)


@pytest.mark.skipif(
    not CUDA or torch.cuda.get_device_capability() < (8, 9), reason="FP8 matmul needs CUDA >= 8.9"
)
def test_cuda_model_with_graphs_serves_like_the_emulation(tiny, tmp_path) -> None:
    """The whole engine on the GPU (bf16, CUDA graphs): _scaled_mm layers against the same weights
    served by the emulation."""
    config, dense = tiny
    tensors, _ = fp8_checkpoint(dense, "channel", False)
    path = write_checkpoint(tmp_path / "fp8", config, tensors, compressed_tensors_config())
    fast = llm(path, device="cuda")
    emulated = llm(path, device="cuda", enforce_eager=True)
    for module in emulated.engine.runner.model.modules():
        if isinstance(module, QuantLinear):
            assert module.fp8_mm
            module.fp8_mm = False
            module.emulated_weight = module.method.dequantize(module)
    assert_serves_like(fast, emulated, max_diff=0.1, rms_diff=0.02)
