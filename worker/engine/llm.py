"""Offline batch generation: ``LLM(model).generate(prompts, SamplingParams(...))``."""

from __future__ import annotations

from collections.abc import Sequence as Seq
from typing import Any

from kvmesh.models import chat_token_ids
from kvmesh.worker.engine.config import EngineConfig
from kvmesh.worker.engine.llm_engine import LLMEngine
from kvmesh.worker.engine.outputs import CompletionOutput
from kvmesh.worker.engine.sampling_params import SamplingParams


class LLM:
    def __init__(self, model: str = "default", **engine_settings: Any) -> None:
        self.engine = LLMEngine(EngineConfig.from_kwargs(model, **engine_settings))
        self.tokenizer = self.engine.tokenizer
        self._next_id = 0

    def encode_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
        return chat_token_ids(self.tokenizer, messages, add_generation_prompt)

    def generate(
        self,
        prompts: Seq[str] | Seq[list[int]],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        cache_salt: str = "",
    ) -> list[CompletionOutput]:
        """Runs every prompt (text or token ids) to completion, batched; outputs in prompt order."""
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = (
            [sampling_params] * len(prompts)
            if isinstance(sampling_params, SamplingParams)
            else list(sampling_params)
        )
        if len(params) != len(prompts):
            raise ValueError("one SamplingParams per prompt, or a single one for all")
        ids: list[str] = []
        for prompt, p in zip(prompts, params):
            token_ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
            rid = f"offline-{self._next_id}"
            self._next_id += 1
            self.engine.add(self.engine.make_sequence(rid, token_ids, p, cache_salt=cache_salt))
            ids.append(rid)
        prompt_ids = {rid: list(self.engine.seqs[rid].token_ids) for rid in ids}
        texts: dict[str, list[str]] = {rid: [] for rid in ids}
        tokens: dict[str, list[int]] = {rid: [] for rid in ids}
        done: dict[str, CompletionOutput] = {}
        while self.engine.has_work():
            for out in self.engine.step():
                texts[out.request_id].append(out.text)
                tokens[out.request_id].extend(out.token_ids)
                if out.finished:
                    done[out.request_id] = CompletionOutput(
                        request_id=out.request_id,
                        prompt_token_ids=prompt_ids[out.request_id],
                        text="".join(texts[out.request_id]),
                        token_ids=tokens[out.request_id],
                        finish_reason=out.finish_reason or "stop",
                        cached_tokens=out.cached_tokens,
                    )
        return [done[rid] for rid in ids]
