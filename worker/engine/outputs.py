"""What the engine hands back to its callers."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class TokenLogprobs:
    """Log-probability of a sampled token and of the most likely tokens at its position."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # (token id, logprob), most likely first


@dataclass(slots=True)
class StepOutput:
    """One streamed delta of a request from an engine step; the last one has ``finished`` set."""

    request_id: str
    text: str  # new text since the previous delta, whole UTF-8 characters only
    token_ids: list[int]  # new token ids since the previous delta
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    logprobs: list[TokenLogprobs] | None = None  # one per token of token_ids, when asked for


@dataclass(slots=True)
class CompletionOutput:
    """One generated sequence of a prompt (``n`` of them per prompt), shaped like vLLM's."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" | "length" | "abort"
    logprobs: list[TokenLogprobs] | None = None


@dataclass(slots=True)
class RequestOutput:
    """Everything the offline ``LLM`` returns for one prompt, shaped like vLLM's: the answers
    are in ``outputs`` (``outputs[0].text``)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    num_cached_tokens: int = 0
    finished: bool = True

    # Shortcuts to the first (often the only) answer.
    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str:
        return self.outputs[0].finish_reason

    @property
    def cached_tokens(self) -> int:
        return self.num_cached_tokens


@dataclass(slots=True)
class LoadStats:
    running: int
    waiting: int
    kv_usage: float  # fraction of blocks held by live sequences
    num_blocks: int
    block_size: int


@dataclass(slots=True)
class BlockEvent:
    """Prefix-cache changes: chained block hashes (kvmesh.prefix) stored and removed."""

    stored: list[int] = field(default_factory=list)
    removed: list[int] = field(default_factory=list)
    snapshot: bool = False  # stored lists every cached block


@dataclass(slots=True)
class EngineStats:
    """Cumulative counters since start, for metrics."""

    prompt_tokens: int = 0
    generation_tokens: int = 0
    prefix_cache_queries: int = 0  # prompt tokens looked up
    prefix_cache_hits: int = 0  # prompt tokens found cached
    preemptions: int = 0
    finished_requests: int = 0
    model_tokens: int = 0  # tokens run through the model (prefill chunks, decodes, proposals)
    # Speculative decoding: verifications of one sequence's proposals, tokens proposed, and
    # proposals the target kept (each verification also emits one token of the target's own).
    spec_decode_num_drafts: int = 0
    spec_decode_num_draft_tokens: int = 0
    spec_decode_num_accepted_tokens: int = 0
