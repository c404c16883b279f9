"""Speculative decoding against real models on the CPU: greedy outputs identical to plain
decoding (SmolLM2 with prompt lookup and with a draft made of its first layers; random Llama and
Qwen2 configs with both), with chunked prefill, preemption and mixed batches; sampled outputs of a
tiny-vocabulary model that follow the target's exact distribution (chi-square); and a block pool
and prefix cache left exactly as plain decoding leaves them."""

from __future__ import annotations

import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, Qwen2Config

from kvmesh.worker import LLM, SamplingParams
from kvmesh.worker.engine.sampler import sampling_probs

pytestmark = pytest.mark.integration

DOCUMENT = (
    "The Rhine rises in the Swiss Alps, forms part of the Swiss-Austrian, Swiss-Liechtenstein, "
    "Swiss-German and then the Franco-German border, then flows through the German Rhineland and "
    "the Netherlands and eventually empties into the North Sea."
)
COPY_PROMPTS = [
    f"Repeat this text word for word.\n\nText: {DOCUMENT}\n\nRepeated: The Rhine rises",
    f"{DOCUMENT}\n\nQuestion: Where does the Rhine empty? Answer with a quote from the text.\nAnswer:",
    "def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n\n\ndef mul(a, b):\n",
    "Once upon a time",
]
GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small per-token tensor work is dominated by thread hand-offs on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def truncate(model, layers, n: int) -> None:
    """Keeps a causal LM's first ``n`` decoder layers (of ``layers``)."""
    model.model.layers = layers[:n]
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[:n]
    model.config.num_hidden_layers = n


def spec_stats(llm: LLM) -> tuple[int, int]:
    s = llm.engine.stats
    return s.spec_decode_num_draft_tokens, s.spec_decode_num_accepted_tokens


# -- SmolLM2 -----------------------------------------------------------------
@pytest.fixture(scope="module")
def smol_prompts(smollm_dir) -> list[list[int]]:
    tokenizer = AutoTokenizer.from_pretrained(smollm_dir)
    return [tokenizer.encode(p) for p in COPY_PROMPTS]


@pytest.fixture(scope="module")
def smol_reference(smol_prompts) -> list[list[int]]:
    llm = LLM("default", num_blocks=256)
    return [o.token_ids for o in llm.generate(smol_prompts, GREEDY)]


@pytest.mark.parametrize(
    "settings",
    [
        dict(num_blocks=256),
        dict(num_blocks=256, max_num_batched_tokens=48, num_speculative_tokens=7),  # chunked prefill
        dict(num_blocks=14, num_speculative_tokens=3),  # preemption: 4 prompts need ~20 blocks
    ],
    ids=["batched", "chunked-prefill", "preemption"],
)
def test_smollm_prompt_lookup_is_token_for_token_plain_greedy(smol_prompts, smol_reference, settings):
    llm = LLM("default", speculative="ngram", **settings)
    outs = llm.generate(smol_prompts, GREEDY)
    assert [o.token_ids for o in outs] == smol_reference
    drafted, accepted = spec_stats(llm)
    assert 0 < accepted < drafted  # proposals were verified, and some were rejected
    if settings["num_blocks"] == 14:
        assert llm.engine.stats.preemptions > 0


@pytest.fixture(scope="module")
def smol_draft_dir(smollm_dir, tmp_path_factory):
    """SmolLM2's first 8 of 30 layers, with its embeddings, final norm and LM head."""
    model = AutoModelForCausalLM.from_pretrained(smollm_dir, dtype=torch.float32)
    truncate(model, model.model.layers, 8)
    path = tmp_path_factory.mktemp("smol-draft")
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(smollm_dir).save_pretrained(path)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_smollm_draft_model_is_token_for_token_plain_greedy(
    smol_prompts, smol_reference, smol_draft_dir, monkeypatch
):
    from kvmesh.worker.engine.speculative import decoder

    # An 8-layer draft is mostly wrong: it would back off after its first verifications. Keep it
    # proposing, so every step verifies (the default back-off is exercised by the next case).
    monkeypatch.setattr(decoder, "MIN_ACCEPTANCE", 0.0)
    llm = LLM("default", num_blocks=256, speculative_model=str(smol_draft_dir), num_speculative_tokens=3)
    # One request alone, then all together: speculating and plain decodes share steps.
    assert llm.generate(smol_prompts[0], GREEDY)[0].token_ids == smol_reference[0]
    assert [o.token_ids for o in llm.generate(smol_prompts, GREEDY)] == smol_reference
    drafted, accepted = spec_stats(llm)
    assert 0 < accepted < drafted
    assert not llm.engine.speculator.draft.shadows  # finished requests left no draft KV behind
    assert llm.engine.speculator.draft.blocks.num_free_blocks == llm.engine.runner.num_blocks


# -- random Llama / Qwen2 configs -------------------------------------------------
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
    "llama-gqa": lambda v: LlamaConfig(
        vocab_size=v, num_key_value_heads=2, tie_word_embeddings=False, **COMMON
    ),
    "qwen2-bias-tied": lambda v: Qwen2Config(
        vocab_size=v, num_key_value_heads=1, tie_word_embeddings=True, **COMMON
    ),
}


def save_random_model(config, path, tokenizer):
    """A random-weight model, and beside it drafts made of its first layer and of all its layers
    (a draft the target accepts almost always)."""
    torch.manual_seed(7)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(path / "target")
    tokenizer.save_pretrained(path / "target")
    layers = model.model.layers
    for name, n in (("draft-all", len(layers)), ("draft-1", 1)):
        truncate(model, layers, n)
        model.save_pretrained(path / name)
        tokenizer.save_pretrained(path / name)
    return path


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def random_model(request, tmp_path_factory, smollm_dir):
    """A small vocabulary (1024), so that greedy outputs repeat tokens and prompt lookup proposes."""
    path = tmp_path_factory.mktemp(request.param)
    yield save_random_model(CONFIGS[request.param](1024), path, AutoTokenizer.from_pretrained(smollm_dir))
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.parametrize("method", ["ngram", "draft-1", "draft-all"])
def test_random_models_speculate_token_for_token_plain_greedy(random_model, method):
    target = random_model / "target"
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    prompts = [[11, 12, 13, 14, 15, 16, 17, 11, 12, 13], [5, 900, 37, 5, 900], list(range(300, 350))]
    plain = LLM(str(target), num_blocks=128, max_num_batched_tokens=32)
    want = [o.token_ids for o in plain.generate(prompts, params)]
    if method == "ngram":
        spec = {"speculative": "ngram", "ngram_prompt_lookup_min": 1}
    else:
        spec = {"speculative_model": str(random_model / method)}
    llm = LLM(str(target), num_blocks=128, max_num_batched_tokens=32, num_speculative_tokens=5, **spec)
    assert [o.token_ids for o in llm.generate(prompts, params)] == want
    drafted, accepted = spec_stats(llm)
    assert drafted > 0
    if method == "draft-all":  # the same weights: every proposal is the target's own choice
        assert accepted == drafted


def test_log_probabilities_of_verified_tokens_match_plain_decoding(random_model):
    target = random_model / "target"
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=2)
    prompts = [[11, 12, 13, 11, 12, 13, 11, 12], [5, 6, 5, 6, 5, 6]]
    plain = LLM(str(target), num_blocks=64).generate(prompts, params)
    spec = LLM(str(target), num_blocks=64, speculative_model=str(random_model / "draft-all"))
    for want, got in zip(plain, spec.generate(prompts, params)):
        assert got.token_ids == want.token_ids
        assert len(got.outputs[0].logprobs) == len(want.token_ids)
        for a, b in zip(want.outputs[0].logprobs, got.outputs[0].logprobs):
            assert a.token_id == b.token_id
            assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
            assert [t for t, _ in a.top] == [t for t, _ in b.top]


def test_speculation_respects_the_step_budget_and_switches_off_for_large_batches(random_model):
    target = random_model / "target"
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    prompts = [[11, 12, 13, 11, 12, 13, 11, 12], [5, 6, 5, 6, 5, 6], [70, 71, 72, 70, 71, 72]]
    spec = dict(speculative="ngram", ngram_prompt_lookup_min=1, num_speculative_tokens=8)
    plain = [o.token_ids for o in LLM(str(target), num_blocks=64).generate(prompts, params)]
    # Three decodes and a budget of 6 tokens: proposals get what the decodes leave, never more.
    llm = LLM(str(target), num_blocks=64, max_num_batched_tokens=6, **spec)
    engine = llm.engine
    for i, p in enumerate(prompts):
        engine.add(engine.make_sequence(f"b{i}", p, params))
    tokens: dict[str, list[int]] = {f"b{i}": [] for i in range(3)}
    while engine.has_work():
        before = engine.stats.model_tokens
        for out in engine.step():
            tokens[out.request_id] += out.token_ids
        assert engine.stats.model_tokens - before <= 6
    assert list(tokens.values()) == plain
    assert spec_stats(llm)[0] > 0
    # Three requests are above a limit of 2: no step speculates.
    llm = LLM(str(target), num_blocks=64, speculative_disable_batch_size=2, **spec)
    assert [o.token_ids for o in llm.generate(prompts, params)] == plain
    assert spec_stats(llm) == (0, 0)
    assert [o.token_ids for o in llm.generate(prompts[:2], params)] == plain[:2]
    assert spec_stats(llm)[0] > 0


# -- the sampled distribution --------------------------------------------------------
VOCAB = 8
PROMPT = [1, 3, 4, 5, 3, 4, 6, 3]


@pytest.fixture(scope="module")
def tiny_vocab_model(tmp_path_factory, smollm_dir):
    config = LlamaConfig(
        vocab_size=VOCAB,
        num_key_value_heads=2,
        tie_word_embeddings=False,
        **{**COMMON, "initializer_range": 0.5},
    )
    path = tmp_path_factory.mktemp("tiny-vocab")
    yield save_random_model(config, path, AutoTokenizer.from_pretrained(smollm_dir))
    shutil.rmtree(path, ignore_errors=True)


def exact_joint(model_dir, params: SamplingParams, length: int) -> torch.Tensor:
    """The target's probability of every continuation of PROMPT of ``length`` tokens, under the
    request's temperature, top-k and top-p, from transformers' own forward passes."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    joint = torch.ones(1, dtype=torch.float64)
    prefixes = [[]]
    with torch.inference_mode():
        for _ in range(length):
            batch = torch.tensor([PROMPT + p for p in prefixes])
            logits = model(batch).logits[:, -1].float()
            probs = sampling_probs(logits, params).double()  # [prefixes, V]
            joint = (joint[:, None] * probs).flatten()
            prefixes = [[*p, t] for p in prefixes for t in range(VOCAB)]
    return joint


@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_sampled_outputs_follow_the_target_distribution(tiny_vocab_model, method):
    target, draft = tiny_vocab_model / "target", tiny_vocab_model / "draft-1"
    length, n = 3, 3000
    base = SamplingParams(temperature=0.9, top_k=6, top_p=0.95, max_tokens=length, ignore_eos=True)
    spec = (
        {"speculative": "ngram", "ngram_prompt_lookup_min": 1}
        if method == "ngram"
        else {"speculative_model": str(draft)}
    )
    llm = LLM(
        str(target), num_blocks=512, max_num_seqs=256, speculative_disable_batch_size=256,
        num_speculative_tokens=2, **spec,
    )  # fmt: skip
    params = [SamplingParams(**{**_fields(base), "seed": i}) for i in range(n)]
    outs = llm.generate([PROMPT] * n, params)
    counts = torch.zeros(VOCAB**length)
    for o in outs:
        index = 0
        for t in o.token_ids:
            index = index * VOCAB + t
        counts[index] += 1
    drafted, accepted = spec_stats(llm)
    assert 0 < accepted < drafted
    assert chi_square_p_value(counts, exact_joint(target, base.with_defaults({}), length)) > 1e-3


def chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's test of ``counts`` against ``probs``; cells expecting < 5 are pooled."""
    expected = probs.double() * counts.sum()
    small = expected < 5
    obs = torch.cat([counts[~small].double(), counts[small].double().sum()[None]])
    exp = torch.cat([expected[~small], expected[small].sum()[None]])
    keep = exp > 0
    stat = ((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum()
    df = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), stat / 2))


def _fields(p: SamplingParams) -> dict:
    return {name: getattr(p, name) for name in p.__slots__}


# -- the block pool and prefix cache ----------------------------------------------------
def pool_state(llm: LLM) -> tuple:
    bm = llm.engine.block_manager
    return list(bm.ref_counts), list(bm.block_hash), dict(bm.cached), list(bm.free)


def run_checked(llm: LLM, prompt: list[int], params: SamplingParams) -> list[int]:
    """Steps one request to its end, checking after every step that no block is held past the
    verified tokens."""
    engine = llm.engine
    engine.add(engine.make_sequence(f"r{engine.stats.finished_requests}", prompt, params))
    tokens = []
    while engine.has_work():
        for out in engine.step():
            tokens += out.token_ids
        for seq in engine.scheduler.running:
            assert len(seq.block_table) == -(-seq.num_computed_tokens // engine.block_size)
        held = sum(len(s.block_table) for s in engine.scheduler.running)
        assert sum(engine.block_manager.ref_counts) == held
    return tokens


@pytest.mark.parametrize("method", ["ngram", "draft-1", "draft-all"])
def test_rollback_leaves_the_pool_and_prefix_cache_exactly_as_plain_decoding(random_model, method):
    """Two requests through a pool small enough that the second evicts the first's cached blocks."""
    target = random_model / "target"
    params = SamplingParams(temperature=0.0, max_tokens=70, ignore_eos=True)
    first = [7, 8, 9, 10] * 12
    second = [7, 8, 9, 10] * 4 + [40, 41, 42, 43, 44] * 5
    if method == "ngram":
        spec = {"speculative": "ngram", "ngram_prompt_lookup_min": 1}
    else:
        spec = {"speculative_model": str(random_model / method)}
    states, outputs = [], []
    for settings in ({}, {"num_speculative_tokens": 6, **spec}):
        llm = LLM(str(target), num_blocks=10, block_size=16, **settings)
        outputs.append([run_checked(llm, first, params), run_checked(llm, second, params)])
        states.append(pool_state(llm))
        assert llm.engine.block_manager.removed_events  # the second request evicted cached blocks
    assert spec_stats(llm)[0] > 0
    assert outputs[0] == outputs[1]
    assert states[0] == states[1]


# -- the worker --------------------------------------------------------------------
def test_a_worker_started_with_prompt_lookup_reports_acceptance_in_its_metrics(worker_launcher):
    import asyncio
    import time

    import grpc
    from worker_fixtures import scrape

    from kvmesh.client import build_request, generate

    flags = ["--speculative", "ngram", "--num-speculative-tokens", "5", "--ngram-prompt-lookup-max", "3"]
    worker = worker_launcher.start("spec", extra=flags)

    async def ask() -> list[int]:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{worker.port}") as channel:
            request = build_request(COPY_PROMPTS[0], max_tokens=24, temperature=0)
            return list((await generate(channel, request, timeout=300)).token_ids)

    tokens = asyncio.run(ask())
    assert len(tokens) == 24
    deadline = time.monotonic() + 10
    while (samples := scrape(worker.metrics_port)).get("kvmesh:spec_decode_num_drafts_total", 0) == 0:
        assert time.monotonic() < deadline, "no speculative counters in the worker's metrics"
        time.sleep(0.2)
    proposed = samples["kvmesh:spec_decode_num_draft_tokens_total"]
    accepted = samples["kvmesh:spec_decode_num_accepted_tokens_total"]
    assert 0 < accepted <= proposed
    assert samples["kvmesh:spec_decode_draft_acceptance_rate"] == pytest.approx(accepted / proposed)
    drafts = samples["kvmesh:spec_decode_num_drafts_total"]
    assert samples["kvmesh:spec_decode_mean_accepted_tokens"] == pytest.approx(accepted / drafts)
