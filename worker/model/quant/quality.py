"""How far a quantized model's predictions move from a reference's: greedy agreement and the KL
divergence of next-token distributions over a fixed prompt set.

- ``greedy_agreement``: both models continue each prompt greedily for ``new_tokens``; a prompt
  scores the fraction of its tokens before the first one that differs (1.0: identical); the mean
  over prompts. A single early flip costs the rest of that prompt, so this is a strict measure.
- ``mean_kl`` / ``max_kl``: KL(reference || candidate) in nats of the next-token distributions at
  every position of each prompt followed by the reference's own continuation (both models read the
  same tokens: teacher forcing), averaged over, or the largest of, all positions.

``python -m kvmesh.worker.model.quant.quality --model default --candidate quantization=fp8`` prints
them (settings are ``EngineConfig`` fields, ``--reference`` likewise).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass

import torch

from kvmesh.worker.attention import AttentionMetadata

PROMPTS = (
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain what a hash table is in two sentences.",
    "List three uses of a paperclip.",
    "Translate 'good morning' into Spanish and German.",
    "What is 12 times 13? Show your working.",
    "Give me a tip for learning to cook.",
    "Summarise the plot of Romeo and Juliet in one paragraph.",
)


@dataclass(slots=True)
class Quality:
    greedy_agreement: float
    mean_kl: float
    max_kl: float
    positions: int  # positions the KL figures cover


def default_prompts(llm) -> list[list[int]]:
    return [llm.encode_chat([{"role": "user", "content": p}]) for p in PROMPTS]


@torch.inference_mode()
def next_token_logits(llm, token_ids: list[int]) -> torch.Tensor:
    """float32 logits ``[T, vocab]`` after each of ``token_ids``: one forward of the whole sequence
    through the LLM's own model, on a KV cache of its own (the engine's pool and prefix cache are
    not touched)."""
    runner = llm.engine.runner
    device, n, bs = runner.device, len(token_ids), runner.block_size
    pool = runner.kv_cache
    blocks = -(-n // bs)
    cache = pool.new_zeros((pool.shape[0], pool.shape[1], blocks, *pool.shape[3:]))
    meta = AttentionMetadata.whole_prompt(n, bs, device)
    ids = torch.tensor(token_ids, dtype=torch.long, device=device)
    hidden = runner.model(ids, torch.arange(n, device=device), cache, meta)
    return runner.model.compute_logits(hidden).float().cpu()


def compare(reference, candidate, prompts: list[list[int]], new_tokens: int = 32) -> Quality:
    """``reference`` and ``candidate`` are kvmesh.worker.LLM objects sharing a tokenizer."""
    from kvmesh.worker import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    ref_out = reference.generate(prompts, params)
    cand_out = candidate.generate(prompts, params)
    agreement, kls = [], []
    for prompt, r, c in zip(prompts, ref_out, cand_out):
        same = 0
        for a, b in zip(r.token_ids, c.token_ids):
            if a != b:
                break
            same += 1
        agreement.append(same / max(len(r.token_ids), 1))
        sequence = list(prompt) + list(r.token_ids)[:-1]  # the last token's successor is not scored
        p = torch.log_softmax(next_token_logits(reference, sequence), dim=-1)
        q = torch.log_softmax(next_token_logits(candidate, sequence), dim=-1)
        kls.append((p.exp() * (p - q)).sum(dim=-1).clamp_min(0.0))
    kl = torch.cat(kls)
    return Quality(
        greedy_agreement=sum(agreement) / len(agreement),
        mean_kl=float(kl.mean()),
        max_kl=float(kl.max()),
        positions=int(kl.numel()),
    )


def _settings(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="default")
    parser.add_argument("--reference", nargs="*", default=[], help="EngineConfig settings, KEY=VALUE")
    parser.add_argument("--candidate", nargs="*", default=[], help="EngineConfig settings, KEY=VALUE")
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    from kvmesh.worker import LLM

    reference = LLM(args.model, **_settings(args.reference))
    candidate = LLM(args.model, **_settings(args.candidate))
    result = compare(reference, candidate, default_prompts(reference), args.new_tokens)
    print(json.dumps(asdict(result), indent=1))


if __name__ == "__main__":
    main()
