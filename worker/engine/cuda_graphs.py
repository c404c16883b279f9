"""CUDA graphs for decode steps.

A decode step launches a few kernels per layer with almost no work each; at
small batches the GPU would wait on Python. So the model's forward for a
decode-only step (one token per sequence) is captured once per batch size in
``capture_sizes`` into one shared memory pool, and each step copies its
inputs into static buffers and replays the smallest graph that fits. Padded
rows write no KV (slot -1) and attend to nothing (seq_len 0); their outputs
are dropped. The decode split count is fixed at capture (from the context
limit), so the graph holds for any context length up to it.
"""

from __future__ import annotations

import logging
import time

import torch

from kvmesh.worker.attention import AttentionMetadata

log = logging.getLogger(__name__)


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
        self.max_seq_len = max_seq_len
        max_blocks = -(-max_seq_len // block_size)
        n = self.max_batch
        self.input_ids = torch.zeros(n, dtype=torch.long, device=device)
        self.positions = torch.zeros(n, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.int64, device=device)
        self.seq_lens = torch.zeros(n, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(n, max_blocks, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=device)  # one token each
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}

    def _meta(self, batch: int) -> AttentionMetadata:
        return AttentionMetadata(
            query_start_loc=self.query_start_loc[: batch + 1],
            seq_lens=self.seq_lens[:batch],
            block_tables=self.block_tables[:batch],
            slot_mapping=self.slot_mapping[:batch],
            max_query_len=1,
            max_seq_len=self.max_seq_len,
        )

    def _forward(self, batch: int) -> torch.Tensor:
        return self.model(self.input_ids[:batch], self.positions[:batch], self.kv_cache, self._meta(batch))

    @torch.inference_mode()
    def capture(self) -> None:
        start = time.perf_counter()
        pool = None
        for batch in reversed(self.sizes):  # largest first: the smaller ones reuse its memory
            self._forward(batch)  # compiles kernels and settles the allocator outside the capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[batch] = self._forward(batch)
            pool = graph.pool()
            self.graphs[batch] = graph
        torch.cuda.synchronize()
        log.info(
            "Captured %d decode CUDA graphs (batch 1..%d) in %.1f s",
            len(self.sizes),
            self.max_batch,
            time.perf_counter() - start,
        )

    def can_run(self, meta: AttentionMetadata, num_tokens: int) -> bool:
        return (
            meta.max_query_len == 1
            and num_tokens <= self.max_batch
            and meta.max_seq_len <= self.max_seq_len
            and meta.block_tables.shape[1] <= self.block_tables.shape[1]
        )

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        n = input_ids.shape[0]
        batch = next(s for s in self.sizes if s >= n)
        self.input_ids[:n].copy_(input_ids, non_blocking=True)
        self.positions[:n].copy_(positions, non_blocking=True)
        self.slot_mapping[:n].copy_(meta.slot_mapping, non_blocking=True)
        self.seq_lens[:n].copy_(meta.seq_lens, non_blocking=True)
        width = meta.block_tables.shape[1]
        self.block_tables[:n, :width].copy_(meta.block_tables, non_blocking=True)
        if batch > n:  # padding rows from an earlier, larger step must not write or read
            self.slot_mapping[n:batch].fill_(-1)
            self.seq_lens[n:batch].fill_(0)
        self.graphs[batch].replay()
        return self.outputs[batch][:n]
