"""Prompt lookup: propose what followed the latest earlier occurrence of the sequence's last n
tokens (n from the largest lookup size down), in its prompt and output alike. Copy-heavy work
(editing, summarising or quoting a given text, code) repeats long spans, which this finds for
the cost of a dictionary lookup per step.

Each sequence keeps one index per n: n-gram -> start of its latest occurrence that has at least
one token after it. The index grows with the tokens a sequence appends, so a step costs
O(lookup sizes) regardless of the context's length.
"""

from __future__ import annotations

from kvmesh.worker.engine.sequence import Sequence


class _Index:
    __slots__ = ("num_indexed", "starts")

    def __init__(self, sizes: range) -> None:
        self.num_indexed = 0  # tokens whose n-grams (as followed n-grams) are in starts
        self.starts: dict[int, dict[tuple[int, ...], int]] = {n: {} for n in sizes}


class NgramProposer:
    def __init__(self, min_n: int, max_n: int) -> None:
        self.sizes = range(min_n, max_n + 1)
        self.indexes: dict[str, _Index] = {}

    def propose(self, seq: Sequence, k: int) -> list[int]:
        """Up to ``k`` tokens that may follow ``seq.token_ids`` (none when nothing matches)."""
        tokens = seq.token_ids
        index = self.indexes.get(seq.request_id)
        if index is None:
            index = self.indexes[seq.request_id] = _Index(self.sizes)
        self._extend(index, tokens)
        end = len(tokens)
        for n in reversed(self.sizes):
            if end < n:
                continue
            start = index.starts[n].get(tuple(tokens[end - n :]))
            if start is not None:
                # Copied LZ77-style: a match close to the end runs on into the tokens it proposes.
                out = tokens[start + n : start + n + k]
                while len(out) < k:
                    out.append(out[len(out) - (end - start - n)])
                return out
        return []

    def release(self, request_id: str) -> None:
        self.indexes.pop(request_id, None)

    def _extend(self, index: _Index, tokens: list[int]) -> None:
        # An n-gram starting at s is "followed" once token s + n exists: index it when token t
        # (t = s + n) arrives. Later occurrences overwrite earlier ones (the latest wins).
        for t in range(index.num_indexed, len(tokens)):
            for n, starts in index.starts.items():
                if t >= n:
                    starts[tuple(tokens[t - n : t])] = t - n
        index.num_indexed = len(tokens)
