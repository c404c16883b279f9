"""CUDA graphs for decode steps and small prefill/mixed steps.

A step with little work launches a dozen kernels per layer that each run for
microseconds, so the GPU waits on Python. The model's forward is therefore
captured once per shape into one shared memory pool, and such a step copies
its inputs into static buffers and replays the smallest graph that fits:

- decode graphs, one per batch size in ``capture_sizes`` (one token per
  sequence): every decode step up to ``max_num_seqs``;
- prefill graphs, one per token count in ``PREFILL_TOKENS``, for steps of up
  to ``SMALL_SEQS`` sequences: a cached prompt's short tail, small chunks
  beside a few decodes;
- mixed graphs, the same token counts for steps of up to ``max_num_seqs``
  sequences: a prefill chunk beside every running decode (the steps that set
  inter-token latency under load), speculative verification of a batch.
  Their attention grid covers every sequence slot, so a step that fits a
  prefill graph takes that one (a 200-token cached tail costs about 2 ms more
  in a 256-slot grid on an H200 at the 8B shape).

A graph's attention grid covers its bucket and its sequence slots; padded
sequences have no query tokens, so the kernels skip them at once.

Padded tokens write no KV (slot -1); padded sequences attend to nothing
(seq_len 0); their outputs are dropped. The decode split count is fixed at
capture from the context limit, so a graph holds for any context up to it.

A decode graph also holds the LM head and the greedy argmax (every decode row
samples); a prefill graph ends at the final norm, since a chunk that does not
reach its prompt's end samples nothing and its head would read the vocabulary
weights for no use. The step's integer inputs are written on the host into
two pinned staging buffers laid out like the graphs' static buffers, so a
step costs two host-to-device copies and one replay.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import torch

from kvmesh.worker.attention import AttentionMetadata

if TYPE_CHECKING:
    from kvmesh.worker.engine.model_runner import StepInputs

log = logging.getLogger(__name__)

# Fine steps (a padded row costs a full GEMM row) up to 512, coarser up to 1024: the default
# decode_token_budget, so a step of decodes and a prefill chunk always has a graph.
PREFILL_TOKENS = tuple(range(32, 513, 32)) + tuple(range(576, 1025, 64))
SMALL_SEQS = 8


def capture_sizes(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then every 8 to 64, every 16 to 256, every 32 beyond; always ``max_batch``."""
    sizes = [s for s in (1, 2, 4) if s < max_batch]
    sizes += list(range(8, min(max_batch, 64) + 1, 8))
    sizes += list(range(80, min(max_batch, 256) + 1, 16))
    sizes += list(range(288, max_batch + 1, 32))
    if not sizes or sizes[-1] != max_batch:
        sizes.append(max_batch)
    return sorted(set(sizes))


class CudaGraphRunner:
    def __init__(
        self,
        model: torch.nn.Module,
        kv_cache: torch.Tensor,
        max_batch: int,
        max_seq_len: int,
        block_size: int,
        device: torch.device,
    ) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.device = device
        self.sizes = capture_sizes(max_batch)
        self.max_batch = self.sizes[-1]
        self.prefill_tokens = PREFILL_TOKENS
        self.max_seq_len = max_seq_len
        max_tokens = max(self.max_batch, self.prefill_tokens[-1])
        self.max_seqs = max_seqs = self.max_batch
        self.max_blocks = -(-max_seq_len // block_size)
        # int64: input ids, positions, slots, logits rows; int32: seq lens, prefill qsl, block tables.
        sizes64 = (max_tokens, max_tokens, max_tokens, max_tokens)  # verification samples many rows
        sizes32 = (max_seqs, max_seqs + 1, max_seqs * self.max_blocks)
        self.host64 = torch.zeros(sum(sizes64), dtype=torch.int64, pin_memory=device.type == "cuda")
        self.host32 = torch.zeros(sum(sizes32), dtype=torch.int32, pin_memory=device.type == "cuda")
        self.dev64 = torch.zeros(sum(sizes64), dtype=torch.int64, device=device)
        self.dev32 = torch.zeros(sum(sizes32), dtype=torch.int32, device=device)
        self.host64[2 * max_tokens : 3 * max_tokens] = -1
        self.dev64[2 * max_tokens : 3 * max_tokens] = -1
        self.input_ids, self.positions, self.slot_mapping, self.logits_idx = self.dev64.split(sizes64)
        self.seq_lens, self.prefill_qsl, tables = self.dev32.split(sizes32)
        self.block_tables = tables.view(max_seqs, self.max_blocks)
        self.h_ids, self.h_pos, self.h_slots, self.h_rows = (t.numpy() for t in self.host64.split(sizes64))
        self.h_seq_lens, self.h_qsl, h_tables = (t.numpy() for t in self.host32.split(sizes32))
        self.h_tables = h_tables.reshape(max_seqs, self.max_blocks)
        self.tables_offset = sizes32[0] + sizes32[1]
        self.decode_qsl = torch.arange(self.max_batch + 1, dtype=torch.int32, device=device)  # one token each
        self.graphs: dict[tuple[str, int], torch.cuda.CUDAGraph] = {}
        self.outputs: dict[tuple[str, int], torch.Tensor] = {}
        # The decode graphs' LM head output (float32) and its argmax, one row per sequence.
        vocab = model.config.vocab_size if model is not None else 0  # whole: a TP rank's head is a shard
        self.logits = torch.empty(self.max_batch, vocab, dtype=torch.float32, device=device)
        self.greedy = torch.empty(self.max_batch, dtype=torch.int64, device=device)
        self._staged = torch.cuda.Event() if device.type == "cuda" else None

    def _seq_slots(self, kind: str) -> int:
        return min(SMALL_SEQS, self.max_seqs) if kind == "prefill" else self.max_seqs

    def _meta(self, key: tuple[str, int]) -> AttentionMetadata:
        kind, n = key
        if kind == "decode":
            return AttentionMetadata(
                query_start_loc=self.decode_qsl[: n + 1],
                seq_lens=self.seq_lens[:n],
                block_tables=self.block_tables[:n],
                slot_mapping=self.slot_mapping[:n],
                max_query_len=1,
                max_seq_len=self.max_seq_len,
            )
        return AttentionMetadata(
            query_start_loc=self.prefill_qsl[: self._seq_slots(kind) + 1],
            seq_lens=self.seq_lens[: self._seq_slots(kind)],
            block_tables=self.block_tables[: self._seq_slots(kind)],
            slot_mapping=self.slot_mapping[:n],
            max_query_len=n,
            max_seq_len=self.max_seq_len,
        )

    def _forward(self, key: tuple[str, int]) -> torch.Tensor:
        kind, n = key
        hidden = self.model(self.input_ids[:n], self.positions[:n], self.kv_cache, self._meta(key))
        if kind == "decode":
            logits = self.model.compute_logits(hidden, out=self.logits[:n])
            torch.argmax(logits, dim=-1, out=self.greedy[:n])
        return hidden

    @torch.inference_mode()
    def capture(self) -> None:
        start = time.perf_counter()
        keys = [("decode", b) for b in self.sizes] + [("prefill", t) for t in self.prefill_tokens]
        if self.max_seqs > SMALL_SEQS:
            keys += [("mixed", t) for t in self.prefill_tokens]
        pool = None
        for key in sorted(keys, key=lambda k: -k[1]):  # largest first: the smaller ones reuse its memory
            self._forward(key)  # compiles kernels and settles the allocator outside the capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[key] = self._forward(key)
            pool = graph.pool()
            self.graphs[key] = graph
        torch.cuda.synchronize()
        log.info(
            "Captured %d CUDA graphs (decode batch 1..%d, prefill up to %d tokens) in %.1f s",
            len(keys),
            self.max_batch,
            self.prefill_tokens[-1],
            time.perf_counter() - start,
        )

    def _key(
        self, num_tokens: int, num_seqs: int, max_query_len: int, max_seq_len: int, max_blocks: int
    ) -> tuple[str, int] | None:
        if max_seq_len > self.max_seq_len or max_blocks > self.max_blocks:
            return None
        if max_query_len == 1 and num_tokens <= self.max_batch:
            return "decode", next(s for s in self.sizes if s >= num_tokens)
        if num_tokens <= self.prefill_tokens[-1] and num_seqs <= self.max_seqs:
            kind = "prefill" if num_seqs <= SMALL_SEQS else "mixed"
            return kind, next(t for t in self.prefill_tokens if t >= num_tokens)
        return None

    def key_for(self, step: StepInputs) -> tuple[str, int] | None:
        return self._key(
            len(step.input_ids), len(step.seq_lens), step.max_query_len, step.max_seq_len, step.max_blocks
        )

    def can_run(self, step: StepInputs) -> bool:
        return self.key_for(step) is not None

    def run(self, step: StepInputs) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Replays the step's graph; returns the sampled rows' float32 logits and, from decode
        graphs, their argmax (``None, None`` when no row samples)."""
        key = self.key_for(step)
        if key is None:
            raise ValueError("no CUDA graph fits this step (call can_run first)")
        kind, padded = key
        n, seqs, rows = len(step.input_ids), len(step.seq_lens), len(step.logits_rows)
        if self._staged is not None:
            self._staged.synchronize()  # the last step's copy has read the staging buffers
        self.h_ids[:n] = step.input_ids
        self.h_pos[:n] = step.positions
        self.h_slots[:n] = step.slot_mapping
        self.h_slots[n:padded] = -1  # padding from an earlier, larger step must neither write nor read
        self.h_rows[:rows] = step.logits_rows
        self.h_seq_lens[:seqs] = step.seq_lens
        self.h_seq_lens[seqs : padded if kind == "decode" else self._seq_slots(kind)] = 0
        if kind != "decode":
            self.h_qsl[: seqs + 1] = step.query_start_loc
            self.h_qsl[seqs + 1 :] = n
        for i, table in enumerate(step.block_tables):
            self.h_tables[i, : len(table)] = table
        end32 = self.tables_offset + seqs * self.max_blocks  # padded sequences read no table
        self.dev64.copy_(self.host64, non_blocking=True)
        self.dev32[:end32].copy_(self.host32[:end32], non_blocking=True)
        if self._staged is not None:
            self._staged.record()
        self.graphs[key].replay()
        if not rows:
            return None, None
        if kind != "decode":
            hidden = self.outputs[key].index_select(0, self.logits_idx[:rows])
            return self.model.compute_logits(hidden), None
        if rows == n:  # every decode row samples (the usual case)
            return self.logits[:n], self.greedy[:n]
        idx = self.logits_idx[:rows]
        return self.logits.index_select(0, idx), self.greedy.index_select(0, idx)
