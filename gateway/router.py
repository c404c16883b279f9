"""Routing policy: which worker serves a prompt, from its block hashes and the workers' loads.

Pure logic, no I/O: the gateway reads a ``RoutingView`` from the store (one round trip), turns it
into ``Candidate`` rows and asks ``Router.choose``.

``prefix`` policy, in order:

1. *Load bound.* A worker is eligible when, taking this request, it stays within
   ``load_factor x`` the mean load (plus ``slack`` requests, so one busy request on an idle
   cluster does not break affinity) and is not saturated (in-flight cap).
2. *Hot prefix.* A prefix whose share of recent traffic exceeds what one worker may carry under
   the bound (share > load_factor / n) gets k = ceil(share x n / load_factor) replicas: the first k
   workers on the hash ring from its key. Within that set the longest match wins unless it costs
   more than one request of extra load over the least loaded replica, which then takes the
   request and warms its cache: conversations stay where their context is while the prefix
   spreads as load builds, instead of melting one worker.
3. *Longest cached prefix.* Among eligible workers, the longest leading run of cached blocks wins
   (ties: least loaded), provided it covers the routing key (below).
4. *No match.* Consistent hashing with bounded loads on the routing key: walk the ring clockwise
   from the key to the first worker under the bound, so a new prefix converges on one worker and
   only spills, deterministically, to the next one when that worker is full.

The routing key is the chained hash of the first ``key_blocks`` blocks (default 4 = 64 tokens).
The first 16 tokens alone are mostly chat-template boilerplate shared by every tenant; a chained
hash over a few blocks names the system prompt itself. Prompts shorter than that use their last
full block; prompts without a full block go to the least loaded worker.
"""

from __future__ import annotations

import bisect
import math
import time
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass
from enum import Enum

import xxhash

POLICIES = ("prefix", "least-load", "round-robin")


class Outcome(str, Enum):
    PREFIX_HIT = "prefix_hit"  # the longest cached prefix, on an eligible worker
    PREFIX_SPILL = "prefix_spill"  # a longer prefix sits on an overloaded worker; took the next best
    HOT_SPREAD = "hot_spread"  # a hot prefix spread over its replica set
    HASH = "hash"  # no usable match: consistent hashing with bounded loads
    LEAST_LOAD = "least_load"
    ROUND_ROBIN = "round_robin"
    EXHAUSTED = "exhausted"  # every worker saturated


@dataclass(slots=True)
class Candidate:
    worker_id: str
    load: float  # requests on the worker (running + waiting, or the gateway's in-flight if larger)
    matched_blocks: int = 0  # leading prompt blocks the worker holds
    saturated: bool = False  # at its in-flight cap


@dataclass(slots=True)
class Decision:
    worker_id: str | None
    outcome: Outcome
    matched_blocks: int = 0


class HashRing:
    """Consistent-hash ring with virtual nodes; rebuilt only when the worker set changes."""

    def __init__(self, vnodes: int = 64) -> None:
        self.vnodes = vnodes
        self._members: tuple[str, ...] = ()
        self._points: list[int] = []
        self._owners: list[str] = []

    def update(self, members: Sequence[str]) -> None:
        key = tuple(sorted(members))
        if key == self._members:
            return
        pairs = sorted(
            (xxhash.xxh3_64_intdigest(f"{m}#{i}".encode()), m) for m in key for i in range(self.vnodes)
        )
        self._members = key
        self._points = [p for p, _ in pairs]
        self._owners = [m for _, m in pairs]

    def walk(self, key: int) -> Iterator[str]:
        """Distinct members clockwise from ``key``."""
        if not self._points:
            return
        start = bisect.bisect_left(self._points, key)
        seen: set[str] = set()
        n = len(self._points)
        for i in range(n):
            owner = self._owners[(start + i) % n]
            if owner not in seen:
                seen.add(owner)
                yield owner
                if len(seen) == len(self._members):
                    return


class TrafficShare:
    """Exponentially decayed request counts per routing key, to find hot prefixes."""

    def __init__(
        self, half_life_s: float = 30.0, max_keys: int = 4096, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.decay = math.log(2) / half_life_s
        self.max_keys = max_keys
        self.clock = clock
        self._counts: dict[Hashable, tuple[float, float]] = {}  # key -> (count, at)
        self._total = (0.0, clock())

    def _decayed(self, value: tuple[float, float], now: float) -> float:
        count, at = value
        return count * math.exp(-self.decay * (now - at))

    def add(self, key: Hashable) -> None:
        now = self.clock()
        self._counts[key] = (self._decayed(self._counts.get(key, (0.0, now)), now) + 1.0, now)
        self._total = (self._decayed(self._total, now) + 1.0, now)
        if len(self._counts) > self.max_keys:
            self._prune(now)

    def share(self, key: Hashable) -> tuple[float, float]:
        """(this key's share of recent traffic, total recent requests)."""
        now = self.clock()
        total = self._decayed(self._total, now)
        if key not in self._counts or total <= 0:
            return 0.0, total
        return self._decayed(self._counts[key], now) / total, total

    def _prune(self, now: float) -> None:
        ranked = sorted(self._counts.items(), key=lambda kv: self._decayed(kv[1], now), reverse=True)
        self._counts = dict(ranked[: self.max_keys // 2])


class Router:
    def __init__(
        self,
        policy: str = "prefix",
        load_factor: float = 1.25,
        slack: float = 2.0,
        key_blocks: int = 4,
        vnodes: int = 64,
        hot_min_requests: float = 20.0,
        half_life_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if policy not in POLICIES:
            raise ValueError(f"unknown routing policy {policy!r}; choose one of {', '.join(POLICIES)}")
        if load_factor < 1.0:
            raise ValueError("load_factor must be >= 1")
        self.policy = policy
        self.load_factor = load_factor
        self.slack = slack
        self.key_blocks = max(1, key_blocks)
        self.hot_min_requests = hot_min_requests
        self.ring = HashRing(vnodes)
        self.traffic = TrafficShare(half_life_s, clock=clock)  # per routing key
        self.worker_traffic = TrafficShare(half_life_s, clock=clock)  # per worker
        self._rr = 0

    def routing_key(self, hashes: Sequence[int]) -> int | None:
        if not hashes:
            return None
        return hashes[min(len(hashes), self.key_blocks) - 1]

    def choose(self, candidates: Sequence[Candidate], hashes: Sequence[int]) -> Decision:
        open_ = [c for c in candidates if not c.saturated]
        if not open_:
            return Decision(None, Outcome.EXHAUSTED)
        if self.policy == "round-robin":
            return Decision(self._round_robin(open_).worker_id, Outcome.ROUND_ROBIN)
        if self.policy == "least-load":
            return self._pick(self._least_loaded(open_), Outcome.LEAST_LOAD)
        decision = self._prefix(candidates, open_, hashes)
        if decision.worker_id is not None:
            self.worker_traffic.add(decision.worker_id)
        return decision

    def _prefix(
        self, everyone: Sequence[Candidate], open_: list[Candidate], hashes: Sequence[int]
    ) -> Decision:
        key = self.routing_key(hashes)
        if key is None:
            return self._pick(self._least_loaded(open_), Outcome.LEAST_LOAD)
        self.ring.update([c.worker_id for c in everyone])
        self.traffic.add(key)
        total = sum(c.load for c in everyone)
        n = len(everyone)
        bound = self.load_factor * (total + 1) / n + self.slack
        eligible = [c for c in open_ if c.load + 1 <= bound]
        by_id = {c.worker_id: c for c in eligible}

        replicas = self._replicas(key, n)
        if replicas > 1:
            ring_set = [by_id[w] for w in self._first_on_ring(key, replicas) if w in by_id]
            if ring_set:
                least = self._least_loaded(ring_set)
                deepest = min(ring_set, key=lambda c: (-c.matched_blocks, c.load))
                best = deepest if deepest.load <= least.load + 1 else least
                return self._pick(best, Outcome.HOT_SPREAD)

        need = min(len(hashes), self.key_blocks)  # a usable match covers the routing key
        matched = [c for c in eligible if c.matched_blocks >= need]
        if matched:
            best = min(matched, key=lambda c: (-c.matched_blocks, c.load))
            longest = max(c.matched_blocks for c in everyone)
            outcome = Outcome.PREFIX_HIT if best.matched_blocks >= longest else Outcome.PREFIX_SPILL
            return self._pick(best, outcome)

        # Consistent hashing with bounded loads: in flight (strict bound, no slack) and, for a new
        # prefix, recent traffic share too, so new tenants avoid a worker busy with popular ones.
        strict = max(1, math.ceil(self.load_factor * (total + 1) / n))
        open_by_id = {c.worker_id: c for c in open_}
        walk = [open_by_id[w] for w in self.ring.walk(key) if w in open_by_id]
        under = [c for c in walk if c.load + 1 <= strict]
        for c in under:
            if self._under_share(c.worker_id, n):
                return self._pick(c, Outcome.HASH)
        return self._pick(under[0] if under else self._least_loaded(open_), Outcome.HASH)

    def _under_share(self, worker_id: str, n: int) -> bool:
        share, total = self.worker_traffic.share(worker_id)
        return total < self.hot_min_requests or share <= self.load_factor / n

    def _replicas(self, key: int, n: int) -> int:
        share, total = self.traffic.share(key)
        if n <= 1 or total < self.hot_min_requests:
            return 1
        # One worker may carry load_factor / n of the traffic; a prefix above that needs more.
        return min(n, max(1, math.ceil(share * n / self.load_factor - 1e-9)))

    def _first_on_ring(self, key: int, k: int) -> list[str]:
        out: list[str] = []
        for worker_id in self.ring.walk(key):
            out.append(worker_id)
            if len(out) == k:
                break
        return out

    def _least_loaded(self, open_: list[Candidate]) -> Candidate:
        # Ties rotate, so idle workers share work instead of the first one taking all.
        self._rr += 1
        n = len(open_)
        return min(enumerate(open_), key=lambda ic: (ic[1].load, (ic[0] - self._rr) % n))[1]

    def _round_robin(self, open_: list[Candidate]) -> Candidate:
        self._rr += 1
        return sorted(open_, key=lambda c: c.worker_id)[self._rr % len(open_)]

    @staticmethod
    def _pick(c: Candidate, outcome: Outcome) -> Decision:
        return Decision(c.worker_id, outcome, c.matched_blocks)
