"""Turns last-position logits into next tokens: greedy, temperature, top-k, top-p, seeded; and,
for the requests that ask, the log-probabilities of the sampled and the most likely tokens."""

from __future__ import annotations

import torch

from kvmesh.worker.engine.outputs import TokenLogprobs
from kvmesh.worker.engine.sequence import Sequence


def sample(
    logits: torch.Tensor, seqs: list[Sequence], greedy: torch.Tensor | None = None
) -> tuple[list[int], list[TokenLogprobs | None] | None]:
    """``logits [S, V]`` (float32), one row per sequence; ``greedy`` is their argmax when the
    caller already has it (a decode CUDA graph computes it). Returns the tokens and, when any
    sequence asked for them, one ``TokenLogprobs`` (or None) per row."""
    tokens = (logits.argmax(dim=-1) if greedy is None else greedy).tolist()
    for row, seq in enumerate(seqs):
        p = seq.params
        if p.greedy:
            continue
        probs = sampling_probs(logits[row], p)
        gen = seq.generator
        if gen is not None and gen.device != probs.device:
            probs = probs.cpu()
        tokens[row] = int(torch.multinomial(probs, 1, generator=gen).item())
    return tokens, logprobs(logits, seqs, tokens)


def sampling_probs(logits: torch.Tensor, p) -> torch.Tensor:
    """The distribution a request samples from: ``logits [..., V]`` with temperature, top-k and
    top-p applied (speculative verification uses it for the target's and the draft's rows)."""
    x = logits / p.temperature
    if 0 < p.top_k < x.shape[-1]:
        kth = torch.topk(x, p.top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    probs = torch.softmax(x, dim=-1)
    if p.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        cumulative = sorted_probs.cumsum(-1)
        # Keep the smallest prefix whose mass reaches top_p (always at least one token).
        drop = cumulative - sorted_probs > p.top_p
        sorted_probs[drop] = 0.0
        sorted_probs /= sorted_probs.sum(-1, keepdim=True)  # a distribution again
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return probs


def logprobs(
    logits: torch.Tensor, seqs: list[Sequence], tokens: list[int]
) -> list[TokenLogprobs | None] | None:
    """Log-probabilities from the model's raw distribution (before temperature, top-k, top-p), as
    vLLM reports them by default; one batched pass over the rows that asked."""
    rows = [i for i, seq in enumerate(seqs) if seq.params.logprobs is not None]
    if not rows:
        return None
    index = torch.tensor(rows, device=logits.device)
    lp = torch.log_softmax(logits.index_select(0, index).float(), dim=-1)
    chosen = torch.tensor([tokens[i] for i in rows], device=logits.device)
    sampled = lp.gather(1, chosen[:, None])[:, 0].tolist()
    k = max(seqs[i].params.logprobs or 0 for i in rows)
    top_values, top_ids = lp.topk(k, dim=-1) if k else (lp[:, :0], lp[:, :0].long())
    top_values, top_ids = top_values.tolist(), top_ids.tolist()
    out: list[TokenLogprobs | None] = [None] * len(seqs)
    for j, i in enumerate(rows):
        n = seqs[i].params.logprobs or 0
        top = list(zip(top_ids[j][:n], top_values[j][:n]))
        out[i] = TokenLogprobs(token_id=tokens[i], logprob=sampled[j], top=top)
    return out
