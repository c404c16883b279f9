"""Turns last-position logits into next tokens: greedy, temperature, top-k, top-p, seeded."""

from __future__ import annotations

import torch

from kvmesh.worker.engine.sequence import Sequence


def sample(logits: torch.Tensor, seqs: list[Sequence], greedy: torch.Tensor | None = None) -> list[int]:
    """``logits [S, V]`` (float32), one row per sequence; ``greedy`` is their argmax when the
    caller already has it (a decode CUDA graph computes it)."""
    tokens = (logits.argmax(dim=-1) if greedy is None else greedy).tolist()
    for row, seq in enumerate(seqs):
        p = seq.params
        if p.greedy:
            continue
        x = logits[row] / p.temperature
        if 0 < p.top_k < x.shape[-1]:
            kth = torch.topk(x, p.top_k).values[-1]
            x = x.masked_fill(x < kth, float("-inf"))
        probs = torch.softmax(x, dim=-1)
        if p.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            cumulative = sorted_probs.cumsum(-1)
            # Keep the smallest prefix whose mass reaches top_p (always at least one token).
            drop = cumulative - sorted_probs > p.top_p
            sorted_probs[drop] = 0.0
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        gen = seq.generator
        if gen is not None and gen.device != probs.device:
            probs = probs.cpu()
        tokens[row] = int(torch.multinomial(probs, 1, generator=gen).item())
    return tokens
