"""GPTQ and AWQ weight-only checkpoints: packing, GPTQ calibration, the fused dequantize-GEMM
kernel, loading through the engine, and quality on SmolLM2.

The formats are pinned by reference dequantizers written here from the tools' own conventions
(AutoGPTQ's ``qweight``/``qzeros`` shifts with v1's ``zero - 1``, AutoAWQ's interleaved nibbles),
independent of kvmesh's repacking. Without CUDA the kernel runs under Triton's interpreter at
small shapes (float32 and float16; the interpreter's bfloat16 is not faithful); with CUDA the
``cuda_only`` cases run it compiled at Llama-3-8B's shapes in bfloat16 and float16.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from kernel_mode import CUDA, DELEGATE, run_in_interpreter  # noqa: E402 (before triton: see kernel_mode)

DEVICE = torch.device("cuda" if CUDA else "cpu")
kernel_case = pytest.mark.skipif(DELEGATE, reason="run by test_kernel_cases_in_interpreter_subprocess")
cuda_only = pytest.mark.skipif(not CUDA, reason="the compiled kernel at real shapes needs CUDA")

from kvmesh.worker.kernels.quant_int import LaunchConfig, choose_config  # noqa: E402
from kvmesh.worker.model.quant import QuantLinear, QuantSpec, method_for  # noqa: E402
from kvmesh.worker.model.quant.awq import quantize_awq  # noqa: E402
from kvmesh.worker.model.quant.calibration import Calibration, calibrate_gptq  # noqa: E402
from kvmesh.worker.model.quant.gptq import quantize_gptq  # noqa: E402
from kvmesh.worker.model.quant.intweight import (  # noqa: E402
    AWQ_ORDER,
    pack_cols,
    pack_rows,
    unpack_cols,
    unpack_rows,
)
from kvmesh.worker.model.quant.make_checkpoint import main as make_checkpoint_main  # noqa: E402
from kvmesh.worker.model.quant.make_checkpoint import make_checkpoint  # noqa: E402

# ---- reference dequantizers: the tools' formats, written out -------------------------------------


def _nibbles(words: torch.Tensor, bits: int) -> torch.Tensor:
    """``[..., W]`` int32 -> ``[..., W, 32 / bits]``: value j of each word sits at bits ``j * bits``."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)
    return (words.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)


def gptq_reference(t: dict[str, torch.Tensor], bits: int, v1: bool = True) -> torch.Tensor:
    """AutoGPTQ's dequantization: ``scales[g_idx] * (w - (qzeros + 1)[g_idx])`` -> float32 [out, in]."""
    w = _nibbles(t["qweight"].t(), bits).reshape(t["qweight"].shape[1], -1).t()  # [in, out]
    zeros = _nibbles(t["qzeros"], bits).reshape(t["qzeros"].shape[0], -1) + (1 if v1 else 0)
    g = t["g_idx"].long()
    return ((w - zeros[g]).float() * t["scales"].float()[g]).t()


def awq_reference(t: dict[str, torch.Tensor], group_size: int) -> torch.Tensor:
    """AutoAWQ GEMM's dequantization: nibble i of a word is column AWQ_ORDER[i] of its eight."""
    reverse = [AWQ_ORDER.index(c) for c in range(8)]
    w = _nibbles(t["qweight"], 4)[..., reverse].reshape(t["qweight"].shape[0], -1)  # [in, out]
    zeros = _nibbles(t["qzeros"], 4)[..., reverse].reshape(t["qzeros"].shape[0], -1)
    g = torch.arange(w.shape[0]) // group_size
    return ((w - zeros[g]).float() * t["scales"].float()[g]).t()


def _layer(method: str, params: dict, in_f: int, out_f: int, tensors: dict, bias=None) -> QuantLinear:
    """A QuantLinear holding ``tensors`` (checkpoint names), repacked for the kernel."""
    m = method_for(QuantSpec(method, params))
    layer = QuantLinear(in_f, out_f, bias is not None, m)
    layer.create_weights(torch.float32)
    layer.to_empty(device="cpu")
    with torch.no_grad():
        for name, value in tensors.items():
            getattr(layer, name).copy_(value)
        if bias is not None:
            layer.bias.copy_(bias)
    m.process_after_loading(layer)
    return layer


# (method, params, reference) of the layers the kernel and repacking are checked on.
CASES = {
    "gptq4-g32": ("gptq", dict(bits=4, group_size=32, sym=True, desc_act=False)),
    "gptq4-g32-act-order": ("gptq", dict(bits=4, group_size=32, sym=True, desc_act=True)),
    "gptq4-g128-asym": ("gptq", dict(bits=4, group_size=128, sym=False, desc_act=False)),
    "gptq4-channel": ("gptq", dict(bits=4, group_size=-1, sym=True, desc_act=False)),
    "gptq8-g64-act-order": ("gptq", dict(bits=8, group_size=64, sym=False, desc_act=True)),
    "gptq8-channel": ("gptq", dict(bits=8, group_size=-1, sym=True, desc_act=False)),
    "awq4-g32": ("awq", dict(bits=4, group_size=32, zero_point=True, version="gemm")),
    "awq4-g128": ("awq", dict(bits=4, group_size=128, zero_point=True, version="gemm")),
}


def _checkpoint_tensors(method: str, params: dict, weight: torch.Tensor) -> dict[str, torch.Tensor]:
    if method == "gptq":
        p = params
        return quantize_gptq(weight, p["bits"], p["group_size"], sym=p["sym"], desc_act=p["desc_act"])
    return quantize_awq(weight, params["group_size"])


def _reference(method: str, params: dict, tensors: dict) -> torch.Tensor:
    if method == "gptq":
        return gptq_reference(tensors, params["bits"])
    return awq_reference(tensors, params["group_size"])


# ---- packing -------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [4, 8])
def test_pack_unpack_round_trips(bits) -> None:
    gen = torch.Generator().manual_seed(bits)
    q = torch.randint(0, 1 << bits, (64, 48), generator=gen, dtype=torch.int32)
    assert torch.equal(unpack_rows(pack_rows(q, bits), bits), q)
    assert torch.equal(unpack_cols(pack_cols(q, bits), bits), q)
    if bits == 4:
        assert torch.equal(unpack_cols(pack_cols(q, 4, AWQ_ORDER), 4, AWQ_ORDER), q)


def test_word_layouts_match_the_tools() -> None:
    """Values 0..7 in one word: GPTQ's nibble j holds item j; AWQ's holds column AWQ_ORDER[j]."""
    items = torch.arange(8, dtype=torch.int32)
    assert int(pack_rows(items[:, None], 4)[0, 0]) == 0x76543210
    assert int(pack_cols(items[None, :], 4)[0, 0]) == 0x76543210
    assert int(pack_cols(items[None, :], 4, AWQ_ORDER)[0, 0]) == 0x75316420
    eight_bit = torch.tensor([[1], [2], [3], [255]], dtype=torch.int32)
    assert int(pack_rows(eight_bit, 8)[0, 0]) == 0xFF030201 - (1 << 32)  # int32's bits


def test_gptq_v1_stores_zero_minus_one() -> None:
    """Symmetric 4-bit GPTQ has zero 8, stored as 7 in every nibble (0x77777777), as AutoGPTQ does."""
    t = quantize_gptq(torch.randn(32, 64), 4, 32, sym=True)
    assert t["qzeros"].dtype == torch.int32 and t["qzeros"].shape == (2, 4)
    assert (t["qzeros"] == 0x77777777).all()
    assert t["qweight"].shape == (8, 32) and t["scales"].dtype == torch.float16
    assert torch.equal(t["g_idx"], torch.arange(64, dtype=torch.int32) // 32)


def test_act_order_g_idx_is_a_permutation_of_full_groups() -> None:
    weight = torch.randn(16, 128)
    t = quantize_gptq(weight, 4, 32, desc_act=True)
    assert sorted(t["g_idx"].tolist()) == [i // 32 for i in range(128)]
    assert not torch.equal(t["g_idx"], torch.arange(128, dtype=torch.int32) // 32)
    norms = weight.norm(dim=0)  # the most important features form group 0
    assert set(torch.argsort(norms, descending=True)[:32].tolist()) == set(
        (t["g_idx"] == 0).nonzero()[:, 0].tolist()
    )


@pytest.mark.parametrize("case", sorted(CASES))
def test_repacked_layer_dequantizes_to_the_tools_reference(case) -> None:
    method, params = CASES[case]
    weight = torch.randn(96, 256, generator=torch.Generator().manual_seed(3))
    tensors = _checkpoint_tensors(method, params, weight)
    layer = _layer(method, params, 256, 96, tensors)
    ref = _reference(method, params, tensors)
    assert torch.equal(layer.method.dequantize(layer), ref)
    # Round to nearest: within half a step of the dense weight (the top of GPTQ's range may lose one
    # step where a zero was raised to 1, never in these random groups).
    step = (ref - weight).abs().max()
    assert step < 0.6 * (weight.abs().max() * 2 / ((1 << params["bits"]) - 1))
    x = torch.randn(3, 256)
    torch.testing.assert_close(layer(x), x @ ref.t(), rtol=1e-5, atol=1e-4)  # another summation order


# ---- the kernel ----------------------------------------------------------------------------------


@pytest.mark.skipif(not DELEGATE, reason="the kernel cases run in this process")
def test_kernel_cases_in_interpreter_subprocess() -> None:
    run_in_interpreter(__file__, "-k", "kernel")


def _kernel_check(layer: QuantLinear, x: torch.Tensor, config: LaunchConfig | None, bias=None) -> None:
    m = layer.method
    layer.to(DEVICE)  # the layers are built on the CPU; with CUDA the kernel runs compiled there
    x = x.to(DEVICE)
    bias = None if bias is None else bias.to(DEVICE)
    out = m.kernel_matmul(layer, x, bias, config)
    dense = m.dequantize(layer).to(x.dtype)  # the CPU path: dequantize, round to x's dtype, multiply
    ref = x.float() @ dense.float().t() + (0 if bias is None else bias.float())
    assert out.dtype == x.dtype and out.shape == ref.shape
    tol = 1e-4 if x.dtype == torch.float32 else 2e-3 * float(ref.abs().max())
    torch.testing.assert_close(out.float(), ref, rtol=0, atol=tol)


CONFIGS = {
    "auto": None,  # decode below 17 tokens, prefill above
    "split-k": LaunchConfig(16, 32, 64, split_k=3),  # atomics across K splits, gathered scales for g32
    "prefill-tiles": LaunchConfig(32, 64, 32, split_k=1),
    "words-once": LaunchConfig(16, 32, 64, split_k=2, words_once=True),
}


@kernel_case
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("tokens", [1, 5, 37])
@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_kernel_matches_dequantize_then_matmul(case, tokens, config) -> None:
    method, params = CASES[case]
    gen = torch.Generator().manual_seed(tokens)
    weight = torch.randn(96, 256, generator=gen)
    layer = _layer(method, params, 256, 96, _checkpoint_tensors(method, params, weight))
    x = torch.randn(tokens, 256, generator=gen)
    bias = torch.randn(96, generator=gen) if config == "split-k" else None
    _kernel_check(layer, x, CONFIGS[config], bias)


@kernel_case
@pytest.mark.parametrize("dtype", [torch.float16] if not CUDA else [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tokens", [2, 40])
def test_kernel_half_precision_activations(dtype, tokens) -> None:
    method, params = CASES["gptq4-g32-act-order"]
    gen = torch.Generator().manual_seed(5)
    layer = _layer(
        method, params, 256, 96, _checkpoint_tensors(method, params, torch.randn(96, 256, generator=gen))
    )
    _kernel_check(layer, torch.randn(tokens, 256, generator=gen).to(dtype), None)


@kernel_case
def test_kernel_reads_unequal_groups() -> None:
    """A g_idx whose groups are not equal runs (possible in the format, not from the tools): the
    kernel reads each sorted row's group."""
    params = dict(bits=4, group_size=32, sym=False, desc_act=True)
    gen = torch.Generator().manual_seed(9)
    t = quantize_gptq(torch.randn(64, 128, generator=gen), 4, 32, sym=False)
    t["g_idx"] = torch.randint(0, 4, (128,), generator=gen, dtype=torch.int32)
    layer = _layer("gptq", params, 128, 64, t)
    assert layer.w_groups is not None and layer.w_perm is not None
    assert torch.equal(layer.method.dequantize(layer), gptq_reference(t, 4))
    for tokens in (1, 20):
        _kernel_check(layer, torch.randn(tokens, 128, generator=gen), None)


# ---- checkpoints through the engine --------------------------------------------------------------

PROMPTS = ["Hello there, how are you today?", "Numbers: 3 1 4 1 5 9 2 6", "A"]
TINY_CALIBRATION = ["--calibration-seqs", "8", "--calibration-len", "64"]  # of docs/*.md
TINY_CHECKPOINTS = {  # name -> (method, make_checkpoint's settings)
    "gptq4-g32-act-order": ("gptq", ["--bits", "4", "--group-size", "32", "--desc-act", "--rtn"]),
    "gptq4-g32-act-order-calibrated": (
        "gptq",
        ["--bits", "4", "--group-size", "32", "--desc-act", *TINY_CALIBRATION],
    ),
    "gptq8-channel": ("gptq", ["--bits", "8", "--group-size", "-1", "--rtn"]),
    "gptq8-channel-calibrated": ("gptq", ["--bits", "8", "--group-size", "-1", *TINY_CALIBRATION]),
    "awq4-g32": ("awq", ["--bits", "4", "--group-size", "32"]),
}


@pytest.fixture(scope="module")
def tiny_dense(tmp_path_factory, smollm_dir) -> Path:
    """A random Llama (GQA, untied head) saved in float32 with SmolLM2's tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    tokenizer = AutoTokenizer.from_pretrained(smollm_dir)
    torch.manual_seed(11)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=0.2,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    path = tmp_path_factory.mktemp("tiny-dense")
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _dequantized_copy(src: Path, dst: Path) -> Path:
    """The dense model a quantized checkpoint stands for: every layer dequantized by the reference."""
    from safetensors.torch import load_file, save_file

    config = json.loads((src / "config.json").read_text())
    qc = config.pop("quantization_config")
    state = load_file(src / "model.safetensors")
    dense = {}
    for name in [n for n in state if n.endswith(".qweight")]:
        prefix = name.removesuffix(".qweight")
        parts = {
            k.removeprefix(prefix + "."): state.pop(k) for k in list(state) if k.startswith(prefix + ".")
        }
        if qc["quant_method"] == "gptq":
            dense[prefix + ".weight"] = gptq_reference(parts, qc["bits"])
        else:
            dense[prefix + ".weight"] = awq_reference(parts, qc["group_size"])
    dst.mkdir()
    for path in src.iterdir():
        if path.name not in ("config.json", "model.safetensors", "quantize_config.json"):
            (dst / path.name).write_bytes(path.read_bytes())
    (dst / "config.json").write_text(json.dumps(config))
    save_file({**state, **{k: v.contiguous() for k, v in dense.items()}}, dst / "model.safetensors")
    return dst


@pytest.fixture(scope="module", params=sorted(TINY_CHECKPOINTS))
def tiny_quantized(request, tiny_dense, tmp_path_factory) -> tuple[str, Path, Path]:
    """(method, the checkpoint make_checkpoint wrote, its dequantized dense copy)."""
    method, settings = TINY_CHECKPOINTS[request.param]
    root = tmp_path_factory.mktemp(request.param)
    assert make_checkpoint_main(["--method", method, *settings, str(tiny_dense), str(root / "q")]) == 0
    return method, root / "q", _dequantized_copy(root / "q", root / "dense")


def test_checkpoint_files_are_named_and_packed_as_the_tools_write_them(tiny_quantized, request) -> None:
    from safetensors import safe_open

    method, qdir, _ = tiny_quantized
    qc = json.loads((qdir / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == method
    assert (qdir / "tokenizer.json").is_file() and (qdir / "tokenizer_config.json").is_file()
    with safe_open(qdir / "model.safetensors", framework="pt") as f:
        names = set(f.keys())
        prefix = "model.layers.1.mlp.down_proj."  # in 256, out 128
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.float32
        qweight, scales = f.get_tensor(prefix + "qweight"), f.get_tensor(prefix + "scales")
        groups = 1 if qc["group_size"] == -1 else 256 // qc["group_size"]
        pack = 32 // qc["bits"]
        assert qweight.dtype == torch.int32 and scales.dtype == torch.float16
        assert scales.shape == (groups, 128)
        if method == "gptq":
            assert qweight.shape == (256 // pack, 128)
            assert f.get_tensor(prefix + "qzeros").shape == (groups, 128 // pack)
            assert f.get_tensor(prefix + "g_idx").dtype == torch.int32
            assert json.loads((qdir / "quantize_config.json").read_text())["bits"] == qc["bits"]
            calibrated = "--rtn" not in TINY_CHECKPOINTS[request.node.callspec.params["tiny_quantized"]][1]
            assert qc["meta"]["quantizer"] == [
                "kvmesh make_checkpoint (gptq, 8 calibration sequences of 64)"
                if calibrated
                else "kvmesh make_checkpoint (round-to-nearest)"
            ]
            assert qc["damp_percent"] == 0.01
        else:
            assert qweight.shape == (256, 16) and f.get_tensor(prefix + "qzeros").shape == (groups, 16)
    assert not any(n.endswith("_proj.weight") for n in names)
    assert "lm_head.weight" in names and "model.layers.0.self_attn.q_proj.qweight" in names


def test_checkpoint_serves_the_tokens_of_its_dequantized_dense_model(tiny_quantized) -> None:
    """float32 on the CPU: the quantized layers multiply by exactly the dequantized weights, so the
    logits agree to float32 rounding (summation order) and the greedy tokens are identical."""
    from kvmesh.worker import LLM, SamplingParams
    from kvmesh.worker.model.quant import quality

    method, qdir, dense_dir = tiny_quantized
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    dense = LLM(str(dense_dir), num_blocks=64)
    prompts = [dense.tokenizer.encode(p) for p in PROMPTS]
    expected = [o.token_ids for o in dense.generate(prompts, params)]
    for choice in ("auto", method):
        quantized = LLM(str(qdir), num_blocks=64, quantization=choice)
        assert quantized.engine.runner.quant.method == method
        assert [o.token_ids for o in quantized.generate(prompts, params)] == expected
    sequence = prompts[0] + expected[0]
    torch.testing.assert_close(
        quality.next_token_logits(quantized, sequence),
        quality.next_token_logits(dense, sequence),
        rtol=1e-4,
        atol=1e-4,
    )


def test_wrong_or_unsupported_quantization_is_refused(tiny_quantized, tmp_path) -> None:
    from kvmesh.worker import LLM

    method, qdir, _ = tiny_quantized
    other = "awq" if method == "gptq" else "gptq"
    with pytest.raises(ValueError, match=f"{method}-quantized"):
        LLM(str(qdir), num_blocks=16, quantization=other)
    with pytest.raises(ValueError, match="cannot expand"):
        LLM(str(qdir), num_blocks=16, quantization="none")
    # The same files with a setting kvmesh does not serve.
    bad = tmp_path / "bad"
    bad.mkdir()
    for path in qdir.iterdir():
        if path.name != "config.json":
            (bad / path.name).symlink_to(path)
    config = json.loads((qdir / "config.json").read_text())
    edit, message = ({"bits": 3}, "3 bits") if method == "gptq" else ({"version": "gemv"}, "gemv")
    config["quantization_config"].update(edit)
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        LLM(str(bad), num_blocks=16)


def test_make_checkpoint_refuses_unsupported_settings(tiny_dense, tmp_path, capsys) -> None:
    short = tmp_path / "short.txt"
    short.write_text("Too short to calibrate on.")
    cases = [
        (["--method", "gptq", "--calibration", str(short), "--calibration-len", "64"], "fewer than one"),
        (["--method", "gptq", "--calibration-seqs", "0"], "must be positive"),
        (["--method", "awq", "--calibration", str(short)], "calibrate GPTQ"),
        (["--method", "gptq", "--rtn", "--damp-percent", "0.1"], "calibrate GPTQ"),
        (["--method", "awq", "--bits", "8"], "4-bit"),
        (["--method", "gptq", "--bits", "3"], "3 bits"),
        (["--method", "awq", "--desc-act"], "GPTQ settings"),
        (["--method", "gptq", "--group-size", "0"], "group-size"),
        (["--method", "awq", "--group-size", "96"], "not a multiple"),  # AutoAWQ's rule too
    ]
    for args, message in cases:
        assert make_checkpoint_main([*args, str(tiny_dense), str(tmp_path / "out")]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ---- GPTQ calibration ----------------------------------------------------------------------------


def _output_error(weight: torch.Tensor, tensors: dict, bits: int, hessian: torch.Tensor) -> float:
    """``||X W^T - X Q^T||^2 = tr((W - Q) X^T X (W - Q)^T)`` over the calibration inputs."""
    diff = (weight.double() - gptq_reference(tensors, bits).double()).t()  # [in, out]
    return float((diff * (hessian @ diff)).sum())


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group", [32, -1])
@pytest.mark.parametrize("desc_act", [False, True])
def test_calibrated_gptq_beats_round_to_nearest_on_every_layer(tiny_dense, bits, group, desc_act) -> None:
    """On the inputs each layer saw during calibration, GPTQ's rounding gives a smaller output error
    than round-to-nearest on the same grid and group order, for all 14 linear layers."""
    from safetensors.torch import load_file

    dense = load_file(tiny_dense / "model.safetensors")
    hessians: dict[str, torch.Tensor] = {}
    calibrated, used = calibrate_gptq(
        tiny_dense,
        Calibration(num_sequences=8, sequence_length=64),
        bits,
        group,
        sym=True,
        desc_act=desc_act,
        hessians=hessians,
    )
    assert used == 8 and len(calibrated) == 14
    ratios = []
    for name, tensors in calibrated.items():
        weight, hessian = dense[name + ".weight"], hessians[name]
        rtn = quantize_gptq(weight, bits, group, desc_act=desc_act, importance=torch.diagonal(hessian))
        if desc_act:  # the same act-order: rows by the Hessian's diagonal
            assert torch.equal(tensors["g_idx"], rtn["g_idx"])
        ratios.append(
            _output_error(weight, tensors, bits, hessian) / _output_error(weight, rtn, bits, hessian)
        )
    print(f"GPTQ / RTN output error, bits {bits} group {group} act-order {desc_act}: {ratios}")
    assert max(ratios) < 0.8  # measured 0.34-0.69 (squared errors)
    # Layers reading one input share its Hessian, hence one g_idx (the engine fuses them).
    for index in (0, 1):
        prefix = f"model.layers.{index}."
        assert torch.equal(
            calibrated[prefix + "self_attn.q_proj"]["g_idx"], calibrated[prefix + "self_attn.v_proj"]["g_idx"]
        )
        assert torch.equal(
            calibrated[prefix + "mlp.gate_proj"]["g_idx"], calibrated[prefix + "mlp.up_proj"]["g_idx"]
        )


# ---- quality on SmolLM2 ----------------------------------------------------------------------------

# make_checkpoint's checkpoints of SmolLM2-135M against its dense float32 weights, quality.py's 8
# prompts and 32 new tokens (docs/quantization.md, "GPTQ and AWQ"). Rounded to nearest, measured:
# GPTQ 4-bit g128 symmetric agreement 0.051, mean KL 0.745 (act-order by weight norms 0.109, 0.823);
# AWQ 4-bit g64 0.117, 0.503; GPTQ 8-bit g128 0.672, 0.0036. A 135M model is fragile under 4-bit
# rounding: these bounds pin the numbers (about 1.35x the KL, half the agreement; 8-bit 3x), they do
# not claim 4-bit is good. Calibrated (Calibration's defaults: 32 sequences of 256 tokens of
# docs/*.md after the chat prefix): g128 0.105, 0.556; g128 act-order 0.117, 0.387; on two other
# states of the docs 0.141, 0.659 / 0.098, 0.361 and 0.078, 0.561 / 0.051, 0.364. The text moves
# with the docs, so the bounds leave room for it: act-order's KL bound is far below what rounding to
# nearest gives (0.823), so it fails if calibration were skipped; plain g128's only holds it to no
# worse than rounding to nearest.
SMOLLM2_BOUNDS = {  # name -> (method, bits, group, desc_act, calibrated, least agreement, largest mean KL)
    "gptq4-g128": ("gptq", 4, 128, False, False, 0.025, 1.0),
    "gptq4-g128-act-order": ("gptq", 4, 128, True, False, 0.05, 1.1),
    "gptq4-g128-calibrated": ("gptq", 4, 128, False, True, 0.025, 0.78),
    "gptq4-g128-act-order-calibrated": ("gptq", 4, 128, True, True, 0.025, 0.5),
    "awq4-g64": ("awq", 4, 64, False, False, 0.055, 0.7),
    "gptq8-g128": ("gptq", 8, 128, False, False, 0.33, 0.011),
}


@pytest.fixture(scope="module")
def smollm2_reference(smollm_dir):
    from kvmesh.worker import LLM

    return LLM(str(smollm_dir), num_blocks=256)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SMOLLM2_BOUNDS))
def test_smollm2_quality_against_dense(name, smollm_dir, smollm2_reference, tmp_path) -> None:
    from kvmesh.worker import LLM
    from kvmesh.worker.model.quant import quality

    method, bits, group, desc_act, calibrated, min_agreement, max_mean_kl = SMOLLM2_BOUNDS[name]
    calibration = Calibration() if calibrated else None
    make_checkpoint(smollm_dir, tmp_path / name, method, bits, group, desc_act, calibration=calibration)
    candidate = LLM(str(tmp_path / name), num_blocks=256)
    assert candidate.engine.runner.quant.method == method
    result = quality.compare(smollm2_reference, candidate, quality.default_prompts(smollm2_reference), 32)
    print(f"SmolLM2 {name}: {result}")
    assert result.greedy_agreement >= min_agreement
    assert result.mean_kl <= max_mean_kl


# ---- the compiled kernel at Llama-3-8B's shapes (CUDA only) ----------------------------------------

LLAMA3_8B = {  # (in, out) of the fused layers
    "qkv_proj": (4096, 6144),
    "o_proj": (4096, 4096),
    "gate_up_proj": (4096, 28672),
    "down_proj": (14336, 4096),
}
CUDA_CASES = ["gptq4-g128-asym", "gptq4-g32-act-order", "gptq8-channel", "awq4-g128"]


@cuda_only
@pytest.mark.parametrize("shape", sorted(LLAMA3_8B))
@pytest.mark.parametrize("case", CUDA_CASES)
@pytest.mark.parametrize("tokens", [1, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernel_compiled_at_llama3_8b_shapes(shape, case, tokens, dtype) -> None:
    method, params = CASES[case]
    in_f, out_f = LLAMA3_8B[shape]
    gen = torch.Generator(device="cuda").manual_seed(1)
    weight = torch.randn(out_f, in_f, generator=gen, device="cuda") * 0.02
    m = method_for(QuantSpec(method, params))
    layer = QuantLinear(in_f, out_f, False, m)
    layer.create_weights(dtype)
    layer.to_empty(device="cuda")
    m.load_dense(layer, weight)
    m.process_after_loading(layer)
    x = torch.randn(tokens, in_f, generator=gen, device="cuda").to(dtype)
    out = layer(x)
    # The alternative word loading (each word once, repeated in registers) gives the same products.
    config = replace(choose_config(tokens, out_f, in_f, x.device), words_once=True)
    _kernel_check(layer, x, config)
    ref = x.float() @ m.dequantize(layer).to(dtype).float().t()
    assert out.dtype == dtype and torch.isfinite(out).all()
    # Both round the weight to dtype; the products differ in float32 summation order, then the output
    # is rounded to dtype (bfloat16: 2**-8 relative).
    scale = float(ref.abs().max())
    torch.testing.assert_close(
        out.float(), ref, rtol=0, atol=(8e-3 if dtype == torch.bfloat16 else 2e-3) * scale
    )


@cuda_only
def test_engine_serves_a_gptq_checkpoint_on_cuda(tiny_quantized) -> None:
    """The compiled kernel inside the engine (CUDA graphs included) gives the tokens of the same
    checkpoint on the CPU reference path for most steps (bfloat16 vs float32: near-ties may flip)."""
    from kvmesh.worker import LLM, SamplingParams

    method, qdir, dense_dir = tiny_quantized
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    gpu = LLM(str(qdir), dtype="float32")
    assert gpu.engine.runner.device.type == "cuda" and gpu.engine.runner.quant.method == method
    dense = LLM(str(dense_dir), dtype="float32")
    prompts = [dense.tokenizer.encode(p) for p in PROMPTS]
    got = [o.token_ids for o in gpu.generate(prompts, params)]
    want = [o.token_ids for o in dense.generate(prompts, params)]
    same = sum(a == b for g, w in zip(got, want) for a, b in zip(g, w))
    assert same >= 0.8 * sum(len(w) for w in want)
