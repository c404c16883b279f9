"""One speculative step inside the continuous batch.

After the scheduler has planned a step (decodes, prefill chunks, admissions), ``prepare`` lets
each plain decode speculate: up to k proposals, bounded by the step's remaining token budget, the
request's max_tokens and the context, and by free KV blocks (speculation never preempts). The
proposals join the sequence's tokens, so the target runs them as one multi-token query on the
paged cache, like a prefill chunk, and ``execute`` returns the target's logits at every verified
position. Rejection sampling (rejection.py) turns them into the tokens each sequence emits.

The engine then sets each sequence's computed tokens to what was verified and calls
``BlockManager.rollback``: blocks taken only for rejected proposals return to the pool, and the
prefix cache only ever registers blocks of verified tokens. Sequences without proposals this step
(prefills, or nothing to propose) are sampled by the same code path with k = 0, which is plain
sampling. The whole step skips speculation while more than ``speculative_disable_batch_size``
requests are in the engine (running or waiting).

A sequence whose proposals keep failing stops proposing for a while: each verification updates
its acceptance average (the share of its proposals kept, halved weight per step), and when that
falls below ``MIN_ACCEPTANCE`` (0.5) the sequence sits out until the next step whose number is a
multiple of 8, then 16, 32 and 64 while it keeps failing, and proposes once more. The pauses end on
the same steps for every sequence, so their probes share a few verification steps and the steps
between them stay plain decode steps (one sequence that proposes turns a whole step into a
multi-token verification). A verification costs a multi-token target pass (and the
draft's passes), so proposals that are nearly always wrong make every step slower (at 8B with a 4-layer
draft and 1% acceptance: half the speed at batch 1); backing off keeps that cost to a probe now and then.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvmesh.worker.engine.block_manager import BlockManager
from kvmesh.worker.engine.config import EngineConfig
from kvmesh.worker.engine.model_runner import ModelRunner
from kvmesh.worker.engine.outputs import TokenLogprobs
from kvmesh.worker.engine.sampler import logprobs
from kvmesh.worker.engine.scheduler import SchedulerOutput
from kvmesh.worker.engine.sequence import Sequence
from kvmesh.worker.engine.speculative.draft import DraftProposer
from kvmesh.worker.engine.speculative.ngram import NgramProposer
from kvmesh.worker.engine.speculative.rejection import accept_greedy, accept_sampled

MIN_ACCEPTANCE = 0.5  # below this average share of proposals kept, a sequence backs off
BACKOFF_STEPS = (8, 16, 32, 64)


@dataclass(slots=True)
class _Track:
    """One sequence's record of its verifications."""

    acceptance: float = 1.0
    resume_at: int = 0  # the step it may propose again
    failures: int = 0  # consecutive back-offs


@dataclass(slots=True)
class SpecStats:
    """Cumulative counters (EngineStats carries them to the metrics)."""

    num_drafts: int = 0  # verifications of one sequence's proposals
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0


class SpeculativeDecoder:
    def __init__(
        self,
        config: EngineConfig,
        runner: ModelRunner,
        block_manager: BlockManager,
        max_model_len: int,
        draft: DraftProposer | None = None,
    ) -> None:
        self.k = config.num_speculative_tokens
        self.disable_batch_size = config.speculative_disable_batch_size
        self.max_num_batched_tokens = config.max_num_batched_tokens
        self.runner = runner
        self.blocks = block_manager
        self.max_model_len = max_model_len
        self.draft = draft
        self.ngram = (
            None if draft else NgramProposer(config.ngram_prompt_lookup_min, config.ngram_prompt_lookup_max)
        )
        self.stats = SpecStats()
        self._drafts: dict[int, tuple[list[int], torch.Tensor | None]] = {}  # id(seq) -> this step's
        self.active = False  # this step took KV slots for proposals (the engine then rolls back)
        self.tracks: dict[str, _Track] = {}
        self.steps = 0  # steps planned, the clock the back-offs end on

    # -- planning ----------------------------------------------------------
    def prepare(self, out: SchedulerOutput, num_requests: int) -> bool:
        """Adds proposals to the planned step's decodes; True when any sequence has some.
        ``num_requests``: the engine's requests, running and waiting."""
        self._drafts = {}
        self.active = False
        self.steps += 1
        if out.num_preempted or num_requests > self.disable_batch_size:
            return False
        budget = self.max_num_batched_tokens - out.total_tokens
        rows, limits = [], []
        for i, (seq, n) in enumerate(zip(out.seqs, out.num_tokens)):
            if budget <= 0:
                break
            if n != 1 or seq.num_computed_tokens != seq.num_tokens - 1:
                continue  # a prefill chunk
            track = self.tracks.get(seq.request_id)
            if track is not None and track.resume_at > self.steps:
                continue
            p = seq.params
            room = min(
                self.k,
                budget,
                p.max_tokens - seq.num_completion_tokens - 1,
                self.max_model_len - seq.num_tokens - 1,
            )
            if self.draft is not None:
                room = self._fit(seq, room)  # the draft's work is only worth doing for slots we have
            if room > 0:
                rows.append(i)
                limits.append(room)
                budget -= room
        if not rows:
            return False
        self.active = True
        seqs = [out.seqs[i] for i in rows]
        if self.draft is not None:
            drafts, probs = self.draft.propose(seqs, limits)
        else:
            drafts, probs = [], []
            for seq, room in zip(seqs, limits):
                proposal = self.ngram.propose(seq, room)
                proposal = proposal[: self._fit(seq, len(proposal))]
                seq.token_ids.extend(proposal)
                drafts.append(proposal)
                probs.append(None)
        for i, seq, proposal, q in zip(rows, seqs, drafts, probs):
            if proposal:
                out.num_tokens[i] = 1 + len(proposal)
                self._drafts[id(seq)] = (proposal, q)
        return bool(self._drafts)

    def _fit(self, seq: Sequence, want: int) -> int:
        """Takes KV slots for up to ``want`` proposals after the step's own token, as many as the
        free blocks hold; returns how many."""
        while want > 0 and self.blocks.blocks_needed(seq, 1 + want) > self.blocks.num_free_blocks:
            want -= 1
        if want > 0:
            self.blocks.allocate_slots(seq, 1 + want)
        return want

    # -- the target's verification ------------------------------------------
    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> tuple[list[Sequence], list[list[int]], list | None]:
        """Runs the planned step; returns the sequences that sampled, the tokens each emits (the
        kept proposals and one token of the target's), and their log-probabilities when asked."""
        runner = self.runner
        step = runner.host_inputs(out)
        rows: list[int] = []
        spans: list[tuple[Sequence, int, list[int], torch.Tensor | None]] = []
        qsl = step.query_start_loc
        for i, seq in enumerate(out.seqs):
            end = qsl[i + 1]
            if seq.num_computed_tokens + out.num_tokens[i] != seq.num_tokens:
                continue  # a prefill chunk short of the prompt's end samples nothing
            proposal, q = self._drafts.get(id(seq), ([], None))
            spans.append((seq, len(rows), proposal, q))
            rows.extend(range(end - 1 - len(proposal), end))
        step.logits_rows = rows
        graphs = runner.graphs
        if graphs is not None and len(rows) <= len(graphs.h_rows) and graphs.can_run(step):
            logits, _ = graphs.run(step)
        else:
            input_ids, positions, meta, _, _ = runner._device_inputs(step)
            hidden = runner.model(input_ids, positions, runner.kv_cache, meta)
            logits = runner.model.compute_logits(hidden[torch.tensor(rows, device=hidden.device)])
        argmax = logits.argmax(dim=-1).tolist()
        sampled, emitted, lps = [], [], []
        for seq, start, proposal, q in spans:
            k = len(proposal)
            if proposal:
                del seq.token_ids[-k:]  # the engine appends what verification keeps
            if seq.params.greedy:
                tokens = accept_greedy(argmax[start : start + k + 1], proposal)
            else:
                tokens = accept_sampled(logits[start : start + k + 1], proposal, q, seq)
            if proposal:
                self.stats.num_drafts += 1
                self.stats.num_draft_tokens += k
                self.stats.num_accepted_tokens += len(tokens) - 1
                self._track(seq.request_id, (len(tokens) - 1) / k)
            sampled.append(seq)
            emitted.append(tokens)
            lps.append(self._logprobs(logits[start : start + len(tokens)], seq, tokens))
        self._drafts = {}
        return sampled, emitted, lps if any(x is not None for x in lps) else None

    def _track(self, request_id: str, kept: float) -> None:
        track = self.tracks.get(request_id)
        if track is None:
            track = self.tracks[request_id] = _Track()
        track.acceptance = 0.5 * track.acceptance + 0.5 * kept
        if track.acceptance >= MIN_ACCEPTANCE:
            track.failures = 0
            return
        period = BACKOFF_STEPS[min(track.failures, len(BACKOFF_STEPS) - 1)]
        track.resume_at = (self.steps // period + 1) * period
        track.failures += 1
        track.acceptance = MIN_ACCEPTANCE  # one good probe is enough to resume

    @staticmethod
    def _logprobs(logits: torch.Tensor, seq: Sequence, tokens: list[int]) -> list[TokenLogprobs] | None:
        if seq.params.logprobs is None:
            return None
        return logprobs(logits, [seq] * len(tokens), tokens)

    # -- after the step ------------------------------------------------------
    def after_verify(self, seq: Sequence) -> None:
        if self.draft is not None:
            self.draft.after_verify(seq)

    def release(self, request_id: str) -> None:
        self.tracks.pop(request_id, None)
        if self.draft is not None:
            self.draft.release(request_id)
        else:
            self.ngram.release(request_id)
