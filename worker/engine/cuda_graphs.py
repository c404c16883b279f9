"""CUDA graphs for decode steps and small prefill/mixed steps.

A step with little work launches a dozen kernels per layer that each run for
microseconds, so the GPU waits on Python. The model's forward is therefore
captured once per shape into one shared memory pool, and such a step copies
its inputs into static buffers and replays the smallest graph that fits:

- decode graphs, one per batch size in ``capture_sizes`` (one token per
  sequence): every decode step up to ``max_num_seqs``;
- prefill graphs, one per token count in ``PREFILL_TOKENS``, for steps of up
  to ``PREFILL_SEQS`` sequences (a cached prompt's short tail, small chunks
  mixed with a few decodes). Their attention grid covers the bucket; padded
  sequences have no query tokens, so the kernels skip them.

Padded tokens write no KV (slot -1); padded sequences attend to nothing
(seq_len 0); their outputs are dropped. The decode split count is fixed at
capture from the context limit, so a graph holds for any context up to it.
"""

from __future__ import annotations

import logging
import time

import torch

from kvmesh.worker.attention import AttentionMetadata

log = logging.getLogger(__name__)

PREFILL_TOKENS = tuple(range(32, 513, 32))  # fine steps: a padded row costs a full GEMM row
PREFILL_SEQS = 8


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
        self.sizes = capture_sizes(max_batch)
        self.max_batch = self.sizes[-1]
        self.prefill_tokens = PREFILL_TOKENS
        self.max_seq_len = max_seq_len
        max_tokens = max(self.max_batch, self.prefill_tokens[-1])
        max_seqs = max(self.max_batch, PREFILL_SEQS)
        self.input_ids = torch.zeros(max_tokens, dtype=torch.long, device=device)
        self.positions = torch.zeros(max_tokens, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((max_tokens,), -1, dtype=torch.int64, device=device)
        self.seq_lens = torch.zeros(max_seqs, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(
            max_seqs, -(-max_seq_len // block_size), dtype=torch.int32, device=device
        )
        self.decode_qsl = torch.arange(self.max_batch + 1, dtype=torch.int32, device=device)  # one token each
        self.prefill_qsl = torch.zeros(PREFILL_SEQS + 1, dtype=torch.int32, device=device)
        self.graphs: dict[tuple[str, int], torch.cuda.CUDAGraph] = {}
        self.outputs: dict[tuple[str, int], torch.Tensor] = {}

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
            query_start_loc=self.prefill_qsl,
            seq_lens=self.seq_lens[:PREFILL_SEQS],
            block_tables=self.block_tables[:PREFILL_SEQS],
            slot_mapping=self.slot_mapping[:n],
            max_query_len=n,
            max_seq_len=self.max_seq_len,
        )

    def _forward(self, key: tuple[str, int]) -> torch.Tensor:
        n = key[1]
        return self.model(self.input_ids[:n], self.positions[:n], self.kv_cache, self._meta(key))

    @torch.inference_mode()
    def capture(self) -> None:
        start = time.perf_counter()
        keys = [("decode", b) for b in self.sizes] + [("prefill", t) for t in self.prefill_tokens]
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

    def _key(self, meta: AttentionMetadata, num_tokens: int) -> tuple[str, int] | None:
        if meta.max_seq_len > self.max_seq_len or meta.block_tables.shape[1] > self.block_tables.shape[1]:
            return None
        if meta.max_query_len == 1 and num_tokens <= self.max_batch:
            return "decode", next(s for s in self.sizes if s >= num_tokens)
        if num_tokens <= self.prefill_tokens[-1] and meta.num_seqs <= PREFILL_SEQS:
            return "prefill", next(t for t in self.prefill_tokens if t >= num_tokens)
        return None

    def can_run(self, meta: AttentionMetadata, num_tokens: int) -> bool:
        return self._key(meta, num_tokens) is not None

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        n = input_ids.shape[0]
        key = self._key(meta, n)
        assert key is not None, "call can_run first"
        kind, padded = key
        seqs = meta.num_seqs
        self.input_ids[:n].copy_(input_ids, non_blocking=True)
        self.positions[:n].copy_(positions, non_blocking=True)
        self.slot_mapping[:n].copy_(meta.slot_mapping, non_blocking=True)
        self.seq_lens[:seqs].copy_(meta.seq_lens, non_blocking=True)
        width = meta.block_tables.shape[1]
        self.block_tables[:seqs, :width].copy_(meta.block_tables, non_blocking=True)
        # Padding from an earlier, larger step must neither write nor read.
        self.slot_mapping[n:padded].fill_(-1)
        if kind == "decode":
            self.seq_lens[seqs:padded].fill_(0)
        else:
            self.seq_lens[seqs:PREFILL_SEQS].fill_(0)
            self.prefill_qsl[: seqs + 1].copy_(meta.query_start_loc, non_blocking=True)
            self.prefill_qsl[seqs + 1 :].fill_(n)
        self.graphs[key].replay()
        return self.outputs[key][:n]
