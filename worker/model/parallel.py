"""Megatron-style tensor parallelism: which slice of each weight a rank holds, and the layers
whose outputs must be combined across ranks.

With ``size`` ranks, rank ``r`` holds:

- attention: query heads ``[r * H / size, (r + 1) * H / size)`` and the KV heads they read. With at
  least as many KV heads as ranks, KV heads are split the same way; with fewer, each KV head is
  replicated on the ``size / Hkv`` ranks whose query heads read it (``size`` a multiple of Hkv). The
  fused q/k/v projection is column-parallel (no communication), ``o_proj`` row-parallel (one
  all-reduce);
- MLP: columns ``[r * I / size, (r + 1) * I / size)`` of gate and of up (column-parallel), the same
  rows of ``down_proj`` (row-parallel, one all-reduce);
- vocabulary: rows ``[r * Vp, (r + 1) * Vp)`` of the embedding and the LM head, ``Vp = ceil(V / size)``
  (the last rank's tail is zero padding). The embedding looks up the ids it owns and all-reduces;
  the LM head's logits are all-gathered and the padding dropped;
- norms and the rotary tables: whole, on every rank.

Every layer here is the plain module when ``size == 1``, so a single-rank model runs exactly the
code (and rounding) it always ran.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class ParallelGroup:
    """One rank's view of its tensor-parallel group: the device collectives the layers call.

    ``device_pg`` is a gloo (CPU tensors) or NCCL (CUDA tensors) process-group backend built by
    kvmesh.worker.distributed; ``None`` for a single rank. The calls go to the backend directly,
    so several groups can live in one process and none touches torch.distributed's global state.
    """

    def __init__(self, rank: int = 0, size: int = 1, device_pg: Any = None, host_pg: Any = None) -> None:
        if size > 1 and device_pg is None:
            raise ValueError("a group of several ranks needs a process group")
        self.rank, self.size = rank, size
        self.device_pg = device_pg
        self.host_pg = host_pg if host_pg is not None else device_pg  # gloo, for host-side messages

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sums ``x`` over the ranks, in place."""
        if self.size > 1:
            self.device_pg.allreduce([x]).wait()
        return x

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., n]`` on every rank -> ``[..., size * n]``, rank 0's columns first."""
        if self.size == 1:
            return x
        x = x.contiguous()
        if x.is_cuda:  # one flat buffer: NCCL's all-gather-into-tensor (and graph capture) want it
            flat = torch.empty((self.size, *x.shape), dtype=x.dtype, device=x.device)
            self.device_pg._allgather_base(flat, x).wait()
            parts = flat.unbind(0)
        else:
            parts = [torch.empty_like(x) for _ in range(self.size)]
            self.device_pg.allgather([parts], [x]).wait()
        return torch.cat(parts, dim=-1)

    def min_int(self, value: int) -> int:
        """The smallest of every rank's ``value`` (every rank calls it)."""
        if self.size == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64)
        self.host_pg.allreduce([t], _min_op()).wait()
        return int(t.item())


def _min_op():
    import torch.distributed as dist

    opts = dist.AllreduceOptions()
    opts.reduceOp = dist.ReduceOp.MIN
    return opts


SINGLE = ParallelGroup()


@dataclass(frozen=True, slots=True)
class HeadShard:
    """This rank's attention heads: queries ``[q_start, q_start + q_count)``, KV heads likewise."""

    q_start: int
    q_count: int
    kv_start: int
    kv_count: int


def check_shardable(config, size: int) -> None:
    """Raises ValueError (one sentence a user can act on) when ``config`` cannot be split ``size`` ways."""
    if size == 1:
        return
    heads = config.num_attention_heads
    kv = config.num_key_value_heads or heads
    problems = []
    if heads % size:
        problems.append(f"{heads} attention heads are not divisible by {size}")
    if kv >= size and kv % size:
        problems.append(f"{kv} KV heads are not divisible by {size}")
    if kv < size and size % kv:
        problems.append(f"{size} is not a multiple of the {kv} KV heads (they are replicated when fewer)")
    if config.intermediate_size % size:
        problems.append(f"intermediate size {config.intermediate_size} is not divisible by {size}")
    if problems:
        raise ValueError(f"tensor_parallel_size {size} does not fit the model: " + "; ".join(problems))


def head_shard(num_heads: int, num_kv_heads: int, group: ParallelGroup) -> HeadShard:
    q_count = num_heads // group.size
    if num_kv_heads >= group.size:
        kv_count = num_kv_heads // group.size
        kv_start = group.rank * kv_count
    else:  # replicated: the KV head this rank's query heads read
        kv_count = 1
        kv_start = group.rank * num_kv_heads // group.size
    return HeadShard(group.rank * q_count, q_count, kv_start, kv_count)


def split_range(total: int, group: ParallelGroup) -> tuple[int, int]:
    """``[start, end)`` of an evenly divisible dimension held by this rank."""
    n = total // group.size
    return group.rank * n, (group.rank + 1) * n


class RowParallelLinear(nn.Linear):
    """``y = x W^T + b`` with ``W``'s input columns split over the ranks: each rank multiplies its
    slice of ``x`` and the partial sums are all-reduced; the bias (held whole) is added once, after."""

    def __init__(self, in_features: int, out_features: int, bias: bool, group: ParallelGroup) -> None:
        super().__init__(in_features // group.size, out_features, bias=bias)
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.group.size == 1:
            return super().forward(x)
        y = self.group.all_reduce(F.linear(x, self.weight))
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Embedding):
    """Rows ``[vocab_start, vocab_start + rows)`` of the table; ids outside them look up nothing here
    and the rank that holds them fills them in through the all-reduce."""

    def __init__(self, vocab_size: int, hidden_size: int, group: ParallelGroup) -> None:
        self.rows = -(-vocab_size // group.size)
        super().__init__(self.rows, hidden_size)
        self.group = group
        self.vocab_size = vocab_size
        self.vocab_start = group.rank * self.rows

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.group.size == 1:
            return super().forward(ids)
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= self.rows)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out.masked_fill_(outside[:, None], 0.0)
        return self.group.all_reduce(out)


class ParallelLMHead(nn.Linear):
    """The vocabulary projection, its rows split like VocabParallelEmbedding's (so a tied head shares
    the embedding's shard); ``logits`` gathers every rank's columns and drops the padding."""

    def __init__(self, hidden_size: int, vocab_size: int, group: ParallelGroup) -> None:
        self.rows = -(-vocab_size // group.size)
        super().__init__(hidden_size, self.rows, bias=False)
        self.group = group
        self.vocab_size = vocab_size

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        local = super().forward(hidden)
        if self.group.size == 1:
            return local
        return self.group.all_gather_last(local)[..., : self.vocab_size]


def shard_rows(source, start: int, end: int, total_rows: int) -> torch.Tensor:
    """Rows ``[start, end)`` of ``source`` (a tensor or a lazy safetensors slice), zero-padded when
    ``end`` passes its last row (the vocabulary's tail on the last rank)."""
    real_end = min(end, total_rows)
    part = source[start:real_end] if real_end > start else None
    if real_end == end and part is not None:
        return part
    shape = (end - start, *_shape(source)[1:])
    dtype = part.dtype if part is not None else torch.float32
    out = torch.zeros(shape, dtype=dtype)
    if part is not None:
        out[: real_end - start] = part
    return out


def _shape(source) -> tuple[int, ...]:
    return tuple(source.get_shape()) if hasattr(source, "get_shape") else tuple(source.shape)
