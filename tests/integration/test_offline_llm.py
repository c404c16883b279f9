"""The offline ``LLM`` as a vLLM user expects it: a string or a list, ``outputs[0].text``,
``chat()``, ``n``, and the model's own sampling defaults for what a request leaves unset."""

from __future__ import annotations

import json

import pytest

from kvmesh.models import DEFAULT_MODEL_GENERATION
from kvmesh.worker import LLM, SamplingParams

pytestmark = pytest.mark.integration

GREEDY = SamplingParams(temperature=0, max_tokens=12)
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM("default", num_blocks=256)


def test_a_string_is_one_prompt_and_outputs_are_shaped_like_vllms(llm):
    [out] = llm.generate("The capital of France is", GREEDY)
    assert out.prompt == "The capital of France is"
    assert out.prompt_token_ids == llm.tokenizer.encode("The capital of France is")
    [answer] = out.outputs
    assert answer.index == 0 and answer.text.startswith(" Paris")
    assert answer.token_ids and answer.finish_reason in ("stop", "length")


def test_lists_of_strings_token_ids_and_dicts(llm):
    ids = llm.tokenizer.encode("The capital of France is")
    outs = llm.generate(["The capital of France is", {"prompt_token_ids": ids}, ids], GREEDY)
    assert len(outs) == 3
    assert outs[0].outputs[0].token_ids == outs[1].outputs[0].token_ids == outs[2].outputs[0].token_ids
    assert outs[1].prompt is None and outs[1].prompt_token_ids == ids


def test_chat_applies_the_template_for_one_or_many_conversations(llm):
    [out] = llm.chat(QUESTION, GREEDY)
    assert out.outputs[0].text == "The capital of France is Paris."
    assert out.prompt_token_ids == llm.encode_chat(QUESTION)
    other = [{"role": "user", "content": "Name a colour."}]
    both = llm.chat([QUESTION, other], GREEDY)  # batched, each answered as if alone
    assert [o.outputs[0].token_ids for o in both] == [
        out.outputs[0].token_ids,
        llm.chat(other, GREEDY)[0].outputs[0].token_ids,
    ]


def test_n_gives_n_answers_per_prompt_reproducibly_with_a_seed(llm):
    params = SamplingParams(temperature=1.0, max_tokens=8, n=3, seed=7)
    first = llm.generate(["Once upon a time", "In a galaxy"], params)
    assert [[a.index for a in o.outputs] for o in first] == [[0, 1, 2], [0, 1, 2]]
    texts = [a.text for a in first[0].outputs]
    assert len(set(texts)) > 1  # three samples, not one answer three times
    again = llm.generate(["Once upon a time", "In a galaxy"], params)
    tokens = [[a.token_ids for a in o.outputs] for o in first]
    assert [[a.token_ids for a in o.outputs] for o in again] == tokens


def test_the_conversion_keeps_the_models_sampling_defaults(llm, smollm_dir):
    saved = json.loads((smollm_dir / "generation_config.json").read_text())
    assert {k: saved[k] for k in DEFAULT_MODEL_GENERATION} == DEFAULT_MODEL_GENERATION
    assert llm.engine.generation_defaults == DEFAULT_MODEL_GENERATION


def test_unset_sampling_fields_take_the_models_defaults_and_set_ones_win(llm):
    ids = llm.tokenizer.encode("Hi")
    seq = llm.engine.make_sequence("defaults", ids, SamplingParams())
    assert (seq.params.temperature, seq.params.top_p, seq.params.top_k) == (0.2, 0.9, 0)
    seq = llm.engine.make_sequence("override", ids, SamplingParams(temperature=0, top_p=0.5))
    assert (seq.params.temperature, seq.params.top_p) == (0.0, 0.5)


def test_invalid_n_is_refused(llm):
    from kvmesh.worker.engine.errors import InvalidRequest

    with pytest.raises(InvalidRequest, match="n must be >= 1"):
        llm.generate("Hi", SamplingParams(n=0))
