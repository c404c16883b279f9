"""Iteration-level scheduling with a token budget per step.

There is no prefill or decode phase: each step, every running sequence asks
for the tokens it still lacks (one for a decode, a chunk for a prefill), then
waiting sequences are admitted in (priority, arrival) order while the budget,
the sequence cap and the block pool allow. While any sequence decodes, the
step's budget is the smaller ``decode_token_budget``: a decode waits for the
whole step, so the prefill work beside it sets every stream's inter-token
latency; with nothing decoding, prompts get the full budget (time to first
token). Each running decode keeps one token of the budget for itself. When a running sequence cannot grow,
the lowest-priority, latest-arrived running sequence is preempted: its blocks
are freed (its full blocks stay in the prefix cache) and it waits to be
recomputed.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

from kvmesh.worker.engine.block_manager import BlockManager
from kvmesh.worker.engine.sequence import Sequence


@dataclass(slots=True)
class SchedulerOutput:
    seqs: list[Sequence] = field(default_factory=list)
    num_tokens: list[int] = field(default_factory=list)  # new tokens per sequence this step
    num_preempted: int = 0

    @property
    def total_tokens(self) -> int:
        return sum(self.num_tokens)


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        decode_token_budget: int | None = None,
    ) -> None:
        self.blocks = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.decode_token_budget = min(decode_token_budget or max_num_batched_tokens, max_num_batched_tokens)
        self.waiting: list[tuple[tuple[int, int], Sequence]] = []  # heap by (priority, arrival)
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        heapq.heappush(self.waiting, (seq.sort_key, seq))

    def remove(self, seq: Sequence) -> None:
        """Drops a finished or aborted sequence and frees its blocks."""
        if seq in self.running:
            self.running.remove(seq)
            self.blocks.free_sequence(seq)
        else:
            entry = next((e for e in self.waiting if e[1] is seq), None)
            if entry is not None:
                self.waiting.remove(entry)
                heapq.heapify(self.waiting)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        preempted = False
        i = 0
        # Running sequences first, in priority order, so preemption victims come from the tail.
        self.running.sort(key=lambda s: s.sort_key)
        # Every running decode keeps a token of the budget: an earlier request's prefill chunk
        # takes only what the decodes leave, so no stream stalls behind a long prompt.
        decodes_left = sum(1 for s in self.running if s.num_tokens - s.num_computed_tokens <= 1)
        budget = self.decode_token_budget if decodes_left else self.max_num_batched_tokens
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            need = seq.num_tokens - seq.num_computed_tokens
            if need <= 1:
                decodes_left -= 1
                n = min(need, budget)
            else:
                n = min(need, budget - decodes_left)
                if n <= 0:  # this step's budget belongs to decodes; the chunk waits a step
                    i += 1
                    continue
            while not self.blocks.allocate_slots(seq, n):
                victim = self.running[-1]
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            else:
                out.seqs.append(seq)
                out.num_tokens.append(n)
                budget -= n
                i += 1
        out.num_preempted = int(preempted)
        if preempted:
            return out
        # Then admit waiting sequences while everything fits.
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0][1]
            want = min(seq.num_tokens - seq.num_computed_tokens, budget)
            cached = self.blocks.admit(seq, want)
            if cached is None:
                break
            heapq.heappop(self.waiting)
            if seq.num_cached_tokens < 0:
                seq.num_cached_tokens = cached
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            self.running.append(seq)
            out.seqs.append(seq)
            out.num_tokens.append(n)
            budget -= n
        return out

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free_sequence(seq)
        self.num_preemptions += 1
        heapq.heappush(self.waiting, (seq.sort_key, seq))
