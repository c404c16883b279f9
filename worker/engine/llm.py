"""Offline batch generation, shaped like vLLM's ``LLM``::

llm = LLM("default")
out = llm.generate("The capital of France is", SamplingParams(temperature=0))
print(out[0].outputs[0].text)
llm.chat([{"role": "user", "content": "Hi!"}])[0].outputs[0].text
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import replace
from typing import Any

from kvmesh.models import chat_token_ids
from kvmesh.worker.engine.config import EngineConfig
from kvmesh.worker.engine.errors import InvalidRequest
from kvmesh.worker.engine.llm_engine import LLMEngine
from kvmesh.worker.engine.outputs import CompletionOutput, RequestOutput
from kvmesh.worker.engine.sampling_params import SamplingParams

# A prompt: text, token ids, or vLLM's {"prompt": ...} / {"prompt_token_ids": [...]}.
Prompt = str | list[int] | dict[str, Any]
Messages = list[dict[str, str]]


class LLM:
    def __init__(self, model: str = "default", **engine_settings: Any) -> None:
        self.engine = LLMEngine(EngineConfig.from_kwargs(model, **engine_settings))
        self.tokenizer = self.engine.tokenizer
        self._next_id = 0

    def get_tokenizer(self):
        return self.tokenizer

    def encode_chat(self, messages: Messages, add_generation_prompt: bool = True) -> list[int]:
        return chat_token_ids(self.tokenizer, messages, add_generation_prompt)

    def generate(
        self,
        prompts: Prompt | Seq[Prompt],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        cache_salt: str = "",
    ) -> list[RequestOutput]:
        """Runs every prompt to completion, batched; one RequestOutput per prompt, in order.
        A string (or one token-id list) is one prompt; unset sampling fields take the model's
        defaults."""
        return self._run([self._encode(p) for p in _as_list(prompts)], sampling_params, cache_salt)

    def chat(
        self,
        messages: Messages | Seq[Messages],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        add_generation_prompt: bool = True,
        cache_salt: str = "",
    ) -> list[RequestOutput]:
        """One conversation (a list of {role, content}) or several, formatted by the model's chat
        template; one RequestOutput per conversation."""
        if not messages:
            raise ValueError("chat() needs at least one message")
        conversations = [messages] if isinstance(messages[0], dict) else list(messages)
        encoded = [(None, self.encode_chat(list(c), add_generation_prompt)) for c in conversations]
        return self._run(encoded, sampling_params, cache_salt)

    def _encode(self, prompt: Prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            prompt = prompt["prompt"]
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt)
        return None, list(prompt)

    def _run(
        self,
        prompts: list[tuple[str | None, list[int]]],
        sampling_params: SamplingParams | Seq[SamplingParams] | None,
        cache_salt: str,
    ) -> list[RequestOutput]:
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params = list(sampling_params)
        if len(params) != len(prompts):
            raise ValueError("one SamplingParams per prompt, or a single one for all")
        results: list[RequestOutput] = []
        answers: dict[str, tuple[RequestOutput, int]] = {}  # sequence id -> (its result, index)
        for (text, token_ids), p in zip(prompts, params):
            if not isinstance(p.n, int) or p.n < 1:
                raise InvalidRequest(f"n must be >= 1, got {p.n}")
            rid = f"offline-{self._next_id}"
            self._next_id += 1
            result = RequestOutput(rid, text, token_ids, outputs=[])
            for i in range(p.n):
                # n answers are n sequences; the prompt's KV blocks are shared by the prefix cache.
                seed = None if p.seed is None else p.seed + i
                sid = rid if p.n == 1 else f"{rid}-{i}"
                one = replace(p, n=1, seed=seed)
                self.engine.add(self.engine.make_sequence(sid, token_ids, one, cache_salt=cache_salt))
                result.outputs.append(CompletionOutput(i, "", [], "", [] if p.logprobs is not None else None))
                answers[sid] = (result, i)
            results.append(result)
        texts: dict[str, list[str]] = {sid: [] for sid in answers}
        while self.engine.has_work():
            for out in self.engine.step():
                result, i = answers[out.request_id]
                answer = result.outputs[i]
                texts[out.request_id].append(out.text)
                answer.token_ids.extend(out.token_ids)
                if answer.logprobs is not None and out.logprobs:
                    answer.logprobs.extend(out.logprobs)
                if out.finished:
                    answer.text = "".join(texts[out.request_id])
                    answer.finish_reason = out.finish_reason or "stop"
                    if i == 0:
                        result.num_cached_tokens = out.cached_tokens
        return results


def _as_list(prompts: Prompt | Seq[Prompt]) -> list[Prompt]:
    """A string, a dict or a flat list of token ids is one prompt; any other sequence is many."""
    if isinstance(prompts, (str, dict)):
        return [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(t, int) for t in prompts):
        return [prompts]
    return prompts
