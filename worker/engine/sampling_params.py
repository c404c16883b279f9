"""Per-request sampling settings and their validation."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from kvmesh.worker.engine.errors import InvalidRequest

MAX_STOP_STRINGS = 16
MAX_STOP_STRING_LEN = 256
MAX_LOGPROBS = 20


# What a sampling setting left unset means when the model has no default of its own
# (transformers' and vLLM's neutral values).
NEUTRAL_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "top_k": 0}


@dataclass(slots=True)
class SamplingParams:
    """``temperature``, ``top_p`` and ``top_k`` left as None take the model's own defaults (its
    generation_config.json), as in vLLM; the engine resolves them when a request arrives."""

    max_tokens: int = 256
    temperature: float | None = None  # 0 is greedy
    top_p: float | None = None
    top_k: int | None = None  # <= 0 disables
    n: int = 1  # answers per prompt (the offline LLM; each is its own sequence)
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # set: return the sampled token's logprob and this many top ones

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def with_defaults(self, defaults: dict[str, float | int]) -> SamplingParams:
        """A copy whose unset sampling fields take ``defaults`` (the model's), then neutral values."""
        out = replace(self)
        for name, neutral in NEUTRAL_DEFAULTS.items():
            if getattr(out, name) is None:
                setattr(out, name, type(neutral)(defaults.get(name, neutral)))
        return out

    def validate(self, vocab_size: int, max_model_len: int) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise InvalidRequest(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.max_tokens > max_model_len:
            raise InvalidRequest(f"max_tokens {self.max_tokens} exceeds the context length {max_model_len}")
        if not isinstance(self.n, int) or self.n < 1:
            raise InvalidRequest(f"n must be >= 1, got {self.n}")
        if not (self.temperature >= 0.0) or self.temperature != self.temperature:
            raise InvalidRequest(f"temperature must be >= 0, got {self.temperature}")
        if not (0.0 < self.top_p <= 1.0):
            raise InvalidRequest(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k > vocab_size:
            raise InvalidRequest(f"top_k {self.top_k} exceeds the vocabulary size {vocab_size}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise InvalidRequest(f"logprobs must be in 0..{MAX_LOGPROBS}, got {self.logprobs}")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise InvalidRequest(f"at most {MAX_STOP_STRINGS} stop strings are allowed")
        for s in self.stop:
            if not s or len(s) > MAX_STOP_STRING_LEN:
                raise InvalidRequest(f"stop strings must have 1..{MAX_STOP_STRING_LEN} characters")
        for t in self.stop_token_ids:
            if not 0 <= t < vocab_size:
                raise InvalidRequest(f"stop token id {t} is outside the vocabulary (size {vocab_size})")
