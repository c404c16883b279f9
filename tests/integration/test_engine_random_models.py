"""Greedy parity with transformers for random-weight Llama, Qwen2 and Mistral configs:
attention biases, grouped-query attention, tied and untied embeddings, a non-default
head_dim, and a llama3 RoPE scaling."""

from __future__ import annotations

import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

from kvmesh.worker import LLM, SamplingParams

pytestmark = pytest.mark.integration

COMMON = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
    initializer_range=0.2,
    bos_token_id=1,
    eos_token_id=2,
)
CONFIGS = {
    "llama-gqa-tied": lambda v: LlamaConfig(
        vocab_size=v, num_key_value_heads=2, tie_word_embeddings=True, **COMMON
    ),
    "llama-bias-mha-untied": lambda v: LlamaConfig(
        vocab_size=v,
        num_key_value_heads=4,
        attention_bias=True,
        mlp_bias=True,
        tie_word_embeddings=False,
        **COMMON,
    ),
    "llama3-rope-headdim32": lambda v: LlamaConfig(
        vocab_size=v,
        num_key_value_heads=1,
        head_dim=32,
        tie_word_embeddings=False,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
        **COMMON,
    ),
    "qwen2-bias-gqa": lambda v: Qwen2Config(
        vocab_size=v, num_key_value_heads=2, tie_word_embeddings=False, **COMMON
    ),
    "qwen2-tied": lambda v: Qwen2Config(
        vocab_size=v, num_key_value_heads=1, tie_word_embeddings=True, **COMMON
    ),
    "mistral-gqa": lambda v: MistralConfig(
        vocab_size=v, num_key_value_heads=2, tie_word_embeddings=False, sliding_window=None, **COMMON
    ),
}
PROMPTS = ["Hello there, how are you today?", "Numbers: 3 1 4 1 5 9 2 6", "A"]


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def model_dir(request, tmp_path_factory, smollm_dir):
    """A random-weight model saved as a Hugging Face directory, with SmolLM2's tokenizer."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm_dir)
    torch.manual_seed(7)
    config = CONFIGS[request.param](len(tokenizer))
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_greedy_matches_transformers(model_dir):
    ref_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    llm = LLM(str(model_dir), num_blocks=128, max_num_batched_tokens=64)
    prompt_ids = [llm.tokenizer.encode(p) for p in PROMPTS]
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    outs = llm.generate(prompt_ids, params)
    with torch.inference_mode():
        for ids, out in zip(prompt_ids, outs):
            x = torch.tensor([ids])
            ref = ref_model.generate(
                x, attention_mask=torch.ones_like(x), max_new_tokens=20, min_new_tokens=20, do_sample=False
            )
            assert out.token_ids == ref[0, len(ids) :].tolist()


def test_forward_logits_match_transformers(model_dir):
    """The last-position logits of a prefill agree with transformers' forward pass."""
    from kvmesh.worker.engine.scheduler import SchedulerOutput

    ref_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    llm = LLM(str(model_dir), num_blocks=64)
    engine = llm.engine
    ids = llm.tokenizer.encode(PROMPTS[0])
    seq = engine.make_sequence("x", ids, SamplingParams(temperature=0, max_tokens=1))
    engine.block_manager.admit(seq, len(ids))
    inputs, positions, meta, rows, _ = engine.runner.prepare(SchedulerOutput([seq], [len(ids)]))
    with torch.inference_mode():
        hidden = engine.runner.model(inputs, positions, engine.runner.kv_cache, meta)
        ours = engine.runner.model.compute_logits(hidden)
        theirs = ref_model(torch.tensor([ids])).logits[0].float()
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    assert rows == [len(ids) - 1]
