"""The synchronous engine core: requests in, one scheduled model step at a time, deltas out."""

from __future__ import annotations

import logging
import time
from typing import Protocol

from kvmesh.prefix import root_hash
from kvmesh.worker.engine.block_manager import BlockManager
from kvmesh.worker.engine.config import EngineConfig
from kvmesh.worker.engine.detokenizer import IncrementalDetokenizer
from kvmesh.worker.engine.errors import InvalidRequest
from kvmesh.worker.engine.model_runner import ModelRunner
from kvmesh.worker.engine.outputs import EngineStats, LoadStats, StepOutput
from kvmesh.worker.engine.sampling_params import SamplingParams
from kvmesh.worker.engine.scheduler import Scheduler
from kvmesh.worker.engine.sequence import Sequence
from kvmesh.worker.engine.speculative import SpeculativeDecoder
from kvmesh.worker.engine.speculative.draft import DraftProposer
from kvmesh.worker.model import loader

log = logging.getLogger(__name__)


class MetricsSink(Protocol):
    """Observes the engine from its own thread: per step, and per request as it finishes."""

    def on_step(self, num_tokens: int, inter_token_latencies: list[float]) -> None: ...

    def on_finished(self, seq: Sequence) -> None: ...


def check_request(
    prompt_token_ids: list[int],
    params: SamplingParams,
    vocab_size: int,
    max_model_len: int,
    generation_defaults: dict,
) -> SamplingParams:
    """Validates a prompt and its settings (raises InvalidRequest); returns the settings with the
    model's defaults filled in. The worker's front runs it too, so a bad request fails before it
    reaches the engine core."""
    if not prompt_token_ids:
        raise InvalidRequest("prompt is empty")
    if len(prompt_token_ids) >= max_model_len:  # before the scan below: huge prompts fail fast
        raise InvalidRequest(
            f"prompt has {len(prompt_token_ids)} tokens but the context holds {max_model_len}, "
            "leaving no room to generate"
        )
    if not (min(prompt_token_ids) >= 0 and max(prompt_token_ids) < vocab_size):
        bad = next(t for t in prompt_token_ids if not 0 <= t < vocab_size)
        raise InvalidRequest(f"token id {bad} is outside the vocabulary (size {vocab_size})")
    params = params.with_defaults(generation_defaults)
    params.validate(vocab_size, max_model_len)
    return params


class LLMEngine:
    def __init__(self, config: EngineConfig, detokenize: bool = True) -> None:
        """``detokenize=False`` leaves text and stop strings to the caller (the worker's front,
        in another process): outputs then carry token ids only and ``text`` is empty."""
        config.validate()
        self.config = config
        self.detokenize = detokenize
        files = loader.resolve_model(config.model)
        self.model_dir = files.directory
        self.model_name = config.served_model_name or files.name
        hf_config = loader.load_config(files.directory)
        self.tokenizer = loader.load_tokenizer(files.directory)
        self.eos_token_ids = loader.eos_token_ids(hf_config, files.directory)
        # The model's own sampling defaults, for requests that leave a setting unset (as vLLM does).
        self.generation_defaults = loader.generation_defaults(files.directory)
        self.vocab_size = int(hf_config.vocab_size)
        # A draft model loads first, so the target's memory profile counts its weights.
        draft = DraftProposer(config, self.vocab_size) if config.speculative_method == "draft" else None
        self.runner = ModelRunner(config, files.directory, hf_config)
        self.block_size = config.block_size
        # One sequence must always fit in the pool, so preemption can always make progress.
        self.max_model_len = min(self.runner.max_positions, self.runner.num_blocks * self.block_size)
        self.block_manager = BlockManager(
            self.runner.num_blocks, self.block_size, config.enable_prefix_caching
        )
        self.scheduler = Scheduler(
            self.block_manager,
            config.max_num_seqs,
            config.max_num_batched_tokens,
            decode_token_budget=config.decode_token_budget,
        )
        self.speculator: SpeculativeDecoder | None = None
        if config.speculative_method is not None:
            if draft is not None:
                draft.allocate_pool(self.runner.num_blocks)
            self.speculator = SpeculativeDecoder(
                config, self.runner, self.block_manager, self.max_model_len, draft
            )
        self.seqs: dict[str, Sequence] = {}
        self.detokenizers: dict[str, IncrementalDetokenizer] = {}
        self.stats = EngineStats()
        self.metrics_sink: MetricsSink | None = None  # set by the worker's metrics to observe phases
        log.info(
            "Loaded model %s: %d layers, %d KV blocks of %d tokens, context %d, %s on %s, "
            "sampling defaults %s",
            self.model_name,
            self.runner.num_layers,
            self.runner.num_blocks,
            self.block_size,
            self.max_model_len,
            self.runner.dtype,
            self.runner.device,
            self.generation_defaults or "neutral",
        )

    # -- requests --------------------------------------------------------
    def make_sequence(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        priority: int = 0,
        cache_salt: str = "",
    ) -> Sequence:
        """Validates a request and builds its sequence (raises InvalidRequest)."""
        params = check_request(
            prompt_token_ids, params, self.vocab_size, self.max_model_len, self.generation_defaults
        )
        seq = Sequence(
            request_id=request_id,
            token_ids=list(prompt_token_ids),
            params=params,
            root_hash=root_hash(self.model_name, cache_salt),
            priority=priority,
        )
        seq.update_block_hashes(self.block_size)
        return seq

    def add(self, seq: Sequence) -> None:
        if seq.request_id in self.seqs:
            raise InvalidRequest(f"request id {seq.request_id!r} is already running")
        self.seqs[seq.request_id] = seq
        if self.detokenize:
            self.detokenizers[seq.request_id] = IncrementalDetokenizer(
                self.tokenizer, seq.token_ids, seq.params.stop
            )
        seq.added_time = time.monotonic()
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> StepOutput | None:
        seq = self.seqs.get(request_id)
        if seq is None:
            return None
        seq.finish_reason = "abort"
        self.scheduler.remove(seq)
        return self._finish(seq, [])

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def load(self) -> LoadStats:
        return LoadStats(
            running=len(self.scheduler.running),
            waiting=self.scheduler.num_waiting,
            kv_usage=self.block_manager.usage,
            num_blocks=self.block_manager.num_blocks,
            block_size=self.block_size,
        )

    # -- the step --------------------------------------------------------
    def step(self) -> list[StepOutput]:
        out = self.scheduler.schedule()
        self.stats.preemptions = self.scheduler.num_preemptions
        if not out.seqs:
            return []
        now = time.monotonic()
        for seq in out.seqs:
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = now
            if not seq.counted:
                seq.counted = True
                self.stats.prompt_tokens += seq.num_prompt_tokens
                self.stats.prefix_cache_queries += seq.num_prompt_tokens
                self.stats.prefix_cache_hits += seq.num_cached_tokens
        spec = self.speculator
        # Speculation is off while more requests than the limit are in the engine, waiting ones
        # included: an offline batch admitted a few prompts per step is large from its first step.
        load = len(self.scheduler.running) + len(self.scheduler.waiting)
        if spec is not None and spec.prepare(out, load):
            # Verification: the decodes' proposals run as multi-token queries (speculative/).
            sampled, emitted, logprobs = spec.execute(out)
            self.stats.spec_decode_num_drafts = spec.stats.num_drafts
            self.stats.spec_decode_num_draft_tokens = spec.stats.num_draft_tokens
            self.stats.spec_decode_num_accepted_tokens = spec.stats.num_accepted_tokens
        else:
            sampled, tokens, lps = self.runner.execute(out)
            emitted = [[t] for t in tokens]
            logprobs = None if lps is None else [None if lp is None else [lp] for lp in lps]
        self.stats.model_tokens += out.total_tokens
        now = time.monotonic()
        if self.metrics_sink is not None:
            gaps = [now - s.last_token_time for s in sampled if s.last_token_time is not None]
            self.metrics_sink.on_step(out.total_tokens, gaps)
        for seq, n in zip(out.seqs, out.num_tokens):
            seq.num_computed_tokens += n
        # Tokens first: a sequence that samples has computed every token but its newest, so
        # proposals the target rejected drop out of num_computed_tokens here.
        deltas = []
        for row, (seq, tokens) in enumerate(zip(sampled, emitted)):
            seq.first_token_time = seq.first_token_time or now
            seq.last_token_time = now
            detok = self.detokenizers.get(seq.request_id)
            kept: list[int] = []
            for token in tokens:
                seq.token_ids.append(token)
                kept.append(token)
                hit_stop = detok.add(token) if detok is not None else False
                seq.finish_reason = self._finish_reason(seq, token, hit_stop)
                if seq.finished:
                    break
            seq.num_computed_tokens = seq.num_tokens - 1
            seq.update_block_hashes(self.block_size)
            self.stats.generation_tokens += len(kept)
            lps = None if logprobs is None or logprobs[row] is None else logprobs[row][: len(kept)]
            deltas.append((seq, kept, lps))
        if spec is not None and spec.active:
            # KV blocks taken for rejected proposals go back, the last taken first.
            for seq in reversed(out.seqs):
                self.block_manager.rollback(seq)
                spec.after_verify(seq)
        for seq in out.seqs:
            self.block_manager.register_computed(seq)
        outputs = []
        for seq, kept, lps in deltas:
            if seq.finished:
                self.scheduler.remove(seq)
                outputs.append(self._finish(seq, kept))
            else:
                detok = self.detokenizers.get(seq.request_id)
                outputs.append(self._delta(seq, detok.take(final=False) if detok is not None else "", kept))
            if lps is not None:
                outputs[-1].logprobs = lps
        return outputs

    def _finish_reason(self, seq: Sequence, token: int, hit_stop: bool) -> str | None:
        p = seq.params
        if hit_stop or token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_token_ids):
            return "stop"
        if seq.num_completion_tokens >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            return "length"
        return None

    def _delta(self, seq: Sequence, text: str, token_ids: list[int]) -> StepOutput:
        return StepOutput(
            request_id=seq.request_id,
            text=text,
            token_ids=token_ids,
            prompt_tokens=seq.num_prompt_tokens,
            completion_tokens=seq.num_completion_tokens,
            cached_tokens=max(seq.num_cached_tokens, 0),
        )

    def _finish(self, seq: Sequence, token_ids: list[int]) -> StepOutput:
        detok = self.detokenizers.pop(seq.request_id, None)
        del self.seqs[seq.request_id]
        if self.speculator is not None:
            self.speculator.release(seq.request_id)
        self.stats.finished_requests += 1
        if self.metrics_sink is not None:
            self.metrics_sink.on_finished(seq)
        out = self._delta(seq, detok.take(final=True) if detok is not None else "", token_ids)
        out.finished, out.finish_reason = True, seq.finish_reason
        return out
