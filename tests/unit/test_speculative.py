"""Speculative decoding's parts without a model: prompt lookup, the acceptance rules (greedy
identity, and speculative sampling checked by a chi-square test against the exact target
distribution), KV rollback in the block pool, and the engine settings."""

from __future__ import annotations

import pytest
import torch

from kvmesh.prefix import root_hash
from kvmesh.worker.engine.block_manager import BlockManager
from kvmesh.worker.engine.config import EngineConfig
from kvmesh.worker.engine.sampler import sampling_probs
from kvmesh.worker.engine.sampling_params import SamplingParams
from kvmesh.worker.engine.sequence import Sequence
from kvmesh.worker.engine.speculative.ngram import NgramProposer
from kvmesh.worker.engine.speculative.rejection import accept_greedy, accept_sampled


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small per-token tensor work is dominated by thread hand-offs on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_seq(tokens: list[int], rid: str = "r", **params) -> Sequence:
    return Sequence(rid, list(tokens), SamplingParams(**params).with_defaults({}), root_hash("m", ""))


def chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's test of ``counts`` against ``probs``; cells expecting < 5 are pooled."""
    expected = probs.double() * counts.sum()
    small = expected < 5
    obs = torch.cat([counts[~small].double(), counts[small].double().sum()[None]])
    exp = torch.cat([expected[~small], expected[small].sum()[None]])
    keep = exp > 0
    obs, exp = obs[keep], exp[keep]
    stat = ((obs - exp) ** 2 / exp).sum()
    df = len(obs) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), stat / 2))


# -- prompt lookup -----------------------------------------------------------
def test_ngram_proposes_what_followed_the_latest_match_of_the_longest_suffix():
    proposer = NgramProposer(1, 3)
    #        0  1  2  3  4  5  6  7  8  9 10 11
    seq = make_seq([5, 6, 7, 1, 2, 9, 6, 7, 3, 4, 8, 6, 7])
    # "6 7" occurs at 1 and 6; the 3-gram "8 6 7" never did: the latest 2-gram match wins.
    assert proposer.propose(seq, 3) == [3, 4, 8]
    seq.token_ids += [3, 4, 8, 6]
    # Now "8 6" (3-gram "4 8 6") occurred at 9..11: its continuation is 7 3 4 ...
    assert proposer.propose(seq, 2) == [7, 3]


def test_ngram_runs_a_match_on_into_its_own_proposal_and_finds_none_without_one():
    proposer = NgramProposer(2, 2)
    seq = make_seq([1, 2, 3, 1, 2, 3, 1, 2])
    assert proposer.propose(seq, 7) == [3, 1, 2, 3, 1, 2, 3]  # period 3, copied past the end
    assert proposer.propose(make_seq([1, 2, 3, 4], rid="b"), 4) == []
    assert proposer.propose(make_seq([9], rid="c"), 4) == []
    proposer.release("b")
    assert "b" not in proposer.indexes


# -- acceptance --------------------------------------------------------------
def test_greedy_acceptance_keeps_the_matching_prefix_then_the_targets_token():
    assert accept_greedy([4, 5, 6, 7], [4, 5, 6]) == [4, 5, 6, 7]  # all kept, plus a bonus
    assert accept_greedy([4, 9, 6, 7], [4, 5, 6]) == [4, 9]
    assert accept_greedy([3, 5, 6, 7], [4, 5, 6]) == [3]
    assert accept_greedy([8], []) == [8]


@pytest.mark.parametrize("draft", ["model", "point-mass"])
@pytest.mark.parametrize(
    "params",
    [dict(temperature=1.0), dict(temperature=0.7, top_k=4), dict(temperature=1.3, top_p=0.8)],
    ids=["t1", "t0.7-topk4", "t1.3-topp0.8"],
)
def test_speculative_sampling_emits_the_target_distribution(draft, params):
    """Each position's emitted token follows p whatever q proposed; also the first token after a
    rejection and the bonus token: the joint of the first two emitted tokens factorises as p."""
    vocab, n = 6, 3000
    gen = torch.Generator().manual_seed(11)
    target_logits = torch.randn(3, vocab, generator=gen) * 1.5
    draft_logits = torch.randn(2, vocab, generator=gen) * 1.5
    seq = make_seq([0], seed=123, **params)
    p = sampling_probs(target_logits, seq.params)
    q = sampling_probs(draft_logits, seq.params)
    counts = torch.zeros(vocab * vocab)
    proposal_gen = torch.Generator().manual_seed(5)
    for _ in range(n):
        if draft == "model":
            drafts = [int(torch.multinomial(q[j], 1, generator=proposal_gen)) for j in range(2)]
            out = accept_sampled(target_logits, drafts, q, seq)
        else:  # prompt lookup proposes fixed tokens, the 3rd and 2nd most likely under p
            drafts = [int(p[0].argsort(descending=True)[2]), int(p[1].argsort(descending=True)[1])]
            out = accept_sampled(target_logits, drafts, None, seq)
        if len(out) >= 2:
            counts[out[0] * vocab + out[1]] += 1
        else:  # the second token would come from a later step: draw it from p, as plain decoding
            counts[out[0] * vocab + int(torch.multinomial(p[1], 1, generator=proposal_gen))] += 1
    joint = (p[0][:, None] * p[1][None, :]).flatten()
    assert chi_square_p_value(counts, joint) > 1e-3


def test_the_chi_square_check_catches_a_biased_sampler():
    """Sampling straight from q instead of correcting it fails the same test."""
    gen = torch.Generator().manual_seed(11)
    p = torch.softmax(torch.randn(6, generator=gen) * 1.5, -1)
    q = torch.softmax(torch.randn(6, generator=gen) * 1.5, -1)
    counts = torch.bincount(torch.multinomial(q, 3000, replacement=True, generator=gen), minlength=6)
    assert chi_square_p_value(counts, p) < 1e-6


# -- rollback ----------------------------------------------------------------
def test_rollback_returns_blocks_for_rejected_tokens_to_the_front_in_order():
    bm = BlockManager(8, 4)
    seq = make_seq(list(range(6)))
    assert bm.admit(seq, 6) == 0
    seq.num_computed_tokens = 6
    free_before = list(bm.free)
    assert bm.allocate_slots(seq, 1 + 8)  # one token and 8 proposals: positions 6..14
    assert len(seq.block_table) == 4
    seq.num_computed_tokens = 6 + 1 + 1  # one proposal kept
    bm.rollback(seq)
    assert len(seq.block_table) == 2 and list(bm.free) == free_before
    assert bm.ref_counts == [1, 1, 0, 0, 0, 0, 0, 0]


# -- settings ----------------------------------------------------------------
@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(speculative="eagle"), "speculative must be"),
        (dict(speculative="draft"), "needs speculative_model"),
        (dict(speculative="ngram", speculative_model="/m"), "takes no speculative_model"),
        (dict(speculative="ngram", num_speculative_tokens=0), "num_speculative_tokens"),
        (dict(speculative="ngram", ngram_prompt_lookup_min=3, ngram_prompt_lookup_max=2), "ngram lookup"),
        (dict(speculative="ngram", speculative_disable_batch_size=0), "disable_batch_size"),
    ],
)
def test_bad_speculative_settings_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        EngineConfig(**settings).validate()


def test_a_draft_model_path_implies_draft_speculation():
    assert EngineConfig(speculative_model="/m").speculative_method == "draft"
    assert EngineConfig(speculative="ngram").speculative_method == "ngram"
    assert EngineConfig().speculative_method is None


# -- the CRD's engine.speculative block ------------------------------------------
def worker_args(speculative: dict | None) -> object:
    import argparse

    from kvmesh.operator import workerpod
    from kvmesh.operator.spec import DeploymentSpec
    from kvmesh.worker import cli as worker_cli

    raw: dict = {"model": {"source": "pvc://w/m"}}
    if speculative is not None:
        raw["engine"] = {"speculative": speculative}
    command = workerpod.worker_command("llama", "serving", DeploymentSpec.parse(raw))
    parser = argparse.ArgumentParser()
    worker_cli.configure(parser)
    return command, EngineConfig(**worker_cli.engine_kwargs(parser.parse_args(command[2:])))


def test_the_crd_speculative_block_reaches_the_engine_settings():
    command, config = worker_args(None)
    assert "--speculative" not in command and config.speculative_method is None
    _, config = worker_args({"method": "ngram", "numSpeculativeTokens": 6, "ngramMin": 1, "ngramMax": 3})
    config.validate()
    assert (config.speculative_method, config.num_speculative_tokens) == ("ngram", 6)
    assert (config.ngram_prompt_lookup_min, config.ngram_prompt_lookup_max) == (1, 3)
    assert config.speculative_disable_batch_size == 32
    _, config = worker_args({"method": "draft", "draftModel": "/models/draft", "disableBatchSize": 8})
    config.validate()
    assert (config.speculative_method, config.speculative_model) == ("draft", "/models/draft")
    assert config.speculative_disable_batch_size == 8


def test_the_crd_refuses_speculative_settings_the_worker_cannot_run():
    from kvmesh.operator import crd

    block = crd.spec_schema()["properties"]["engine"]["properties"]["speculative"]
    rules = {r["rule"] for r in block["x-kubernetes-validations"]}
    assert "self.method != 'draft' || has(self.draftModel)" in rules
    assert "self.ngramMin <= self.ngramMax" in rules
    assert block["properties"]["method"]["enum"] == ["none", "ngram", "draft"]
    assert block["properties"]["numSpeculativeTokens"]["maximum"] == 16


def test_a_sequence_whose_proposals_fail_backs_off_and_probes_again():
    from kvmesh.worker.engine.speculative.decoder import BACKOFF_STEPS, MIN_ACCEPTANCE, SpeculativeDecoder

    spec = SpeculativeDecoder.__new__(SpeculativeDecoder)  # only the acceptance record is exercised
    spec.tracks, spec.steps = {}, 5
    spec._track("a", 1.0)
    spec._track("a", 0.5)
    assert spec.tracks["a"].resume_at == 0  # 0.75 on average: keeps proposing
    resumes = []
    for _ in range(6):  # every probe fails: the pause doubles up to its cap
        spec._track("a", 0.0)
        resumes.append(spec.tracks["a"].resume_at)
        spec.steps = spec.tracks["a"].resume_at  # the steps sat out
    # Pauses end on multiples of their length: every sequence's probes share the same steps.
    assert resumes == [8, 16, 32, 64, 128, 192]
    assert all(r % min(BACKOFF_STEPS[i], 64) == 0 for i, r in enumerate(resumes[:4]))
    spec._track("a", 0.5)  # a good probe resumes at once and resets the pause
    assert spec.tracks["a"].failures == 0
    assert spec.tracks["a"].acceptance >= MIN_ACCEPTANCE
    spec._track("b", 0.0)  # a new sequence: 0.5 on average, still proposing
    spec._track("b", 0.0)
    assert spec.tracks["b"].resume_at == 192 + 8  # its first pause is the short one
