"""Accepting proposals so that the output follows the target model exactly.

Greedy requests keep a proposal while it equals the target's argmax, and end with the target's
own argmax at the first mismatch (or after the last proposal): token for token what plain
greedy decoding emits.

Sampled requests use speculative sampling (Leviathan et al. 2023; Chen et al. 2023): proposal x,
drawn from the draft's distribution q, is kept with probability min(1, p(x) / q(x)), p being the
target's distribution at that position after temperature, top-k and top-p; the first rejected
position instead samples from norm(max(0, p - q)), and when every proposal is kept a bonus token
is sampled from p at the position after the last. Each emitted token is then distributed exactly
as p. Prompt lookup proposes deterministically: q is a point mass on x, so x is kept with
probability p(x) and a rejection samples p with x removed.
"""

from __future__ import annotations

import torch

from kvmesh.worker.engine.sampler import sampling_probs
from kvmesh.worker.engine.sequence import Sequence


def accept_greedy(argmax: list[int], drafts: list[int]) -> list[int]:
    """``argmax`` of the target at each of the ``len(drafts) + 1`` verified positions."""
    a = 0
    while a < len(drafts) and drafts[a] == argmax[a]:
        a += 1
    return [*drafts[:a], argmax[a]]


def accept_sampled(
    logits: torch.Tensor, drafts: list[int], draft_probs: torch.Tensor | None, seq: Sequence
) -> list[int]:
    """``logits [k + 1, V]``: the target's rows for the verified positions. ``draft_probs [k, V]``:
    the draft's distributions the proposals were drawn from, or None for point masses."""
    k = len(drafts)
    gen = seq.generator
    p = sampling_probs(logits, seq.params)
    if gen is not None and gen.device != p.device:
        p = p.cpu()
        draft_probs = None if draft_probs is None else draft_probs.cpu()
    index = torch.tensor(drafts, dtype=torch.long, device=p.device)
    p_x = p[:k].gather(1, index[:, None])[:, 0]
    if draft_probs is None:
        ratio = p_x
    else:
        q_x = draft_probs.gather(1, index[:, None])[:, 0]
        ratio = p_x / q_x  # q_x > 0: x was drawn from q
    u = torch.rand(k, generator=gen, device=p.device)
    rejected = (u >= ratio).tolist()
    a = rejected.index(True) if True in rejected else k
    if a == k:
        row = p[k]
    else:
        if draft_probs is None:
            row = p[a].clone()
            row[drafts[a]] = 0.0
        else:
            row = (p[a] - draft_probs[a]).clamp_(min=0.0)
        if not float(row.sum()) > 0.0:  # p == q at this position: its residual is p itself
            row = p[a]
    token = int(torch.multinomial(row, 1, generator=gen).item())
    return [*drafts[:a], token]
