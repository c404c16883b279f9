"""The KV block pool: allocation, refcounts, and the automatic prefix cache.

Every block has a refcount. A full, computed block is registered under its
chained hash (kvmesh.prefix), so a later sequence with the same prefix shares
it. Blocks whose refcount drops to zero keep their hash and sit in an LRU free
list: they are reused by a prefix hit until allocation needs them, which evicts
the least recently freed first.
"""

from __future__ import annotations

from collections import OrderedDict

from kvmesh.worker.engine.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.cached: dict[int, int] = {}  # chained hash -> block id
        # Blocks with refcount 0, least recently freed first. Values unused.
        self.free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self.stored_events: list[int] = []
        self.removed_events: list[int] = []

    # -- queries ---------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by live sequences (cached free blocks count as free)."""
        return 1.0 - len(self.free) / self.num_blocks

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        total = seq.num_computed_tokens + num_new_tokens
        return max(0, -(-total // self.block_size) - len(seq.block_table))

    # -- prefix cache ----------------------------------------------------
    def match_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks holding the longest prefix of ``seq``; always leaves one token to compute."""
        if not self.enable_prefix_caching:
            return []
        limit = (seq.num_tokens - 1) // self.block_size
        hits: list[int] = []
        for h in seq.block_hashes[:limit]:
            block = self.cached.get(h)
            if block is None:
                break
            hits.append(block)
        return hits

    def admit(self, seq: Sequence, num_new_tokens: int) -> int | None:
        """Starts a waiting sequence: shares its cached prefix and allocates room for
        ``num_new_tokens`` after it. Returns the number of cached tokens, or None when
        the pool cannot hold it now (nothing changes then)."""
        hits = self.match_prefix(seq)
        num_cached = len(hits) * self.block_size
        num_new_tokens = min(num_new_tokens, seq.num_tokens - num_cached)
        need = -(-(num_cached + num_new_tokens) // self.block_size) - len(hits)
        reusable_free = sum(1 for b in hits if self.ref_counts[b] == 0)
        if need > len(self.free) - reusable_free:
            return None
        for b in hits:
            self._ref(b)
        seq.block_table = hits
        seq.num_computed_tokens = num_cached
        self._allocate(seq, need)
        return num_cached

    def allocate_slots(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Grows a running sequence's block table for ``num_new_tokens`` more tokens."""
        need = self.blocks_needed(seq, num_new_tokens)
        if need > len(self.free):
            return False
        self._allocate(seq, need)
        return True

    def register_computed(self, seq: Sequence) -> None:
        """Registers the sequence's newly full, computed blocks in the prefix cache."""
        if not self.enable_prefix_caching:
            return
        n_full = min(seq.num_computed_tokens // self.block_size, len(seq.block_hashes))
        for i in range(n_full):
            block = seq.block_table[i]
            if self.block_hash[block] is not None:
                continue
            h = seq.block_hashes[i]
            if h in self.cached:  # computed twice (raced with another sequence); keep the first
                continue
            self.block_hash[block] = h
            self.cached[h] = block
            self.stored_events.append(h)

    def free_sequence(self, seq: Sequence) -> None:
        # Reverse order: a chain's tail is evicted before its head, which more prompts share.
        for block in reversed(seq.block_table):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free[block] = None
        seq.block_table = []
        seq.num_computed_tokens = 0

    def rollback(self, seq: Sequence) -> None:
        """Gives back the blocks past ``seq.num_computed_tokens``: those a speculative step took
        for proposals that verification rejected. They go back to the front of the free list,
        last taken first, so the pool's order is as if they had never been taken."""
        keep = -(-seq.num_computed_tokens // self.block_size)
        while len(seq.block_table) > keep:
            block = seq.block_table.pop()
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free[block] = None
                self.free.move_to_end(block, last=False)

    def cached_hashes(self) -> list[int]:
        return list(self.cached)

    def drain_events(self) -> tuple[list[int], list[int]]:
        stored, removed = self.stored_events, self.removed_events
        self.stored_events, self.removed_events = [], []
        return stored, removed

    # -- internals -------------------------------------------------------
    def _ref(self, block: int) -> None:
        if self.ref_counts[block] == 0:
            del self.free[block]
        self.ref_counts[block] += 1

    def _allocate(self, seq: Sequence, count: int) -> None:
        for _ in range(count):
            block, _ = self.free.popitem(last=False)
            h = self.block_hash[block]
            if h is not None:  # evict its cached contents
                del self.cached[h]
                self.block_hash[block] = None
                self.removed_events.append(h)
            self.ref_counts[block] = 1
            seq.block_table.append(block)
