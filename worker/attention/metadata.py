"""Per-step attention metadata: the one object that carries a batch's layout.

A step runs a flat batch of T new tokens from B sequences (prefill chunks and
decodes mixed). Sequence b owns query rows ``query_start_loc[b] :
query_start_loc[b+1]``; its keys are the first ``seq_lens[b]`` tokens of its
context, stored in the paged KV cache through ``block_tables[b]``. The new
tokens are the last ``query_len`` of those, so query row j of sequence b sits
at position ``seq_lens[b] - query_len + j`` and attends causally to keys
``0 ..= that position``.

KV cache layout (one tensor per layer and kind, views of one pool):
``[num_blocks, block_size, num_kv_heads, head_dim]``; token t of a sequence
lives in block ``block_tables[b][t // block_size]`` at offset
``t % block_size``. ``slot_mapping[i] = block * block_size + offset`` is where
new token i's K and V are written (-1: do not write).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(slots=True)
class AttentionMetadata:
    query_start_loc: torch.Tensor  # int32 [B + 1], cumulative query lengths
    seq_lens: torch.Tensor  # int32 [B], context length including this step's tokens
    block_tables: torch.Tensor  # int32 [B, max_blocks_per_seq], padded with 0
    slot_mapping: torch.Tensor  # int64 [T]
    max_query_len: int
    max_seq_len: int
    # Host copies, for backends that loop per sequence (the torch reference).
    query_start_loc_cpu: list[int] | None = None
    seq_lens_cpu: list[int] | None = None
    # Worked out once per step by the first layer that needs them, for all layers: the RoPE cos/sin
    # rows on the unfused path, and whether any sequence decodes (one query row).
    rope_rows: tuple[torch.Tensor, torch.Tensor] | None = None
    has_decode: bool | None = None

    @classmethod
    def whole_prompt(cls, n: int, block_size: int, device=None) -> AttentionMetadata:
        """One sequence of ``n`` new tokens and no cached ones, in blocks ``0, 1, ...`` of a cache of
        its own (slot t holds token t): a forward over a whole prompt outside the scheduler (memory
        profiling, teacher-forced logits, tests)."""
        blocks = -(-n // block_size)
        return cls(
            query_start_loc=torch.tensor([0, n], dtype=torch.int32, device=device),
            seq_lens=torch.tensor([n], dtype=torch.int32, device=device),
            block_tables=torch.arange(blocks, dtype=torch.int32, device=device)[None],
            slot_mapping=torch.arange(n, dtype=torch.int64, device=device),
            max_query_len=n,
            max_seq_len=n,
            query_start_loc_cpu=[0, n],
            seq_lens_cpu=[n],
        )

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]

    @property
    def is_decode_only(self) -> bool:
        return self.max_query_len == 1
