"""What travels with one forwarded generation: its deadline (the client's, clamped) and, once a
worker answers, where it went and why (sent to clients as ``kvmesh-*`` headers)."""

from __future__ import annotations

import time
from dataclasses import dataclass


class Deadline:
    """The client's deadline clamped to the gateway's maximum; ``None`` means no client deadline."""

    def __init__(self, remaining_s: float | None, max_s: float) -> None:
        self.budget = max_s if remaining_s is None else min(remaining_s, max_s)
        self.at = time.monotonic() + self.budget

    def left(self) -> float:
        return self.at - time.monotonic()


@dataclass(slots=True)
class Route:
    """Where a request went and why; the fronts send it as response headers."""

    worker_id: str
    route_us: int
    matched_tokens: int
    outcome: str
    attempts: int

    def headers(self) -> dict[str, str]:
        return {
            "kvmesh-worker": self.worker_id,
            "kvmesh-route-us": str(self.route_us),
            "kvmesh-matched-tokens": str(self.matched_tokens),
            "kvmesh-route-outcome": self.outcome,
            "kvmesh-attempts": str(self.attempts),
        }
