"""Per-request state as the scheduler and model runner see it."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch

from kvmesh.prefix import block_hashes
from kvmesh.worker.engine.sampling_params import SamplingParams

_arrival = itertools.count()


@dataclass(slots=True, eq=False)
class Sequence:
    request_id: str
    token_ids: list[int]
    params: SamplingParams
    root_hash: int  # kvmesh.prefix.root_hash(model, cache_salt)
    priority: int = 0
    num_prompt_tokens: int = 0
    arrival: int = field(default_factory=lambda: next(_arrival))
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # keys of the full blocks of token_ids
    num_computed_tokens: int = 0  # tokens whose KV is in the cache
    num_cached_tokens: int = -1  # prefix-cache hit at first admission; -1 until admitted
    counted: bool = False  # admission already counted in the engine's statistics
    finish_reason: str | None = None
    generator: torch.Generator | None = None
    # Monotonic times for the request-phase metrics (queue, prefill, decode, inter-token).
    added_time: float = 0.0
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None

    def __post_init__(self) -> None:
        self.num_prompt_tokens = len(self.token_ids)
        if self.params.seed is not None:
            self.generator = torch.Generator().manual_seed(self.params.seed)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_completion_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def completion_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def sort_key(self) -> tuple[int, int]:
        return (self.priority, self.arrival)

    def update_block_hashes(self, block_size: int) -> None:
        """Extends ``block_hashes`` over every block of ``token_ids`` that is now full."""
        start, end = len(self.block_hashes) * block_size, len(self.token_ids) // block_size * block_size
        if end > start:
            parent = self.block_hashes[-1] if self.block_hashes else self.root_hash
            self.block_hashes += block_hashes(self.token_ids[start:end], block_size, parent=parent)
