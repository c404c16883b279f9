"""Prefix identity shared by the worker's prefix cache and the gateway's index.

A prompt is cut into full blocks of ``block_size`` tokens. Block i's key is a
chained 64-bit hash::

    h_0 = H(model || 0x00 || cache_salt)        (the root, not a block)
    h_i = H(h_{i-1} as 8 little-endian bytes || token ids of block i as u32 LE)

with H = xxh3-64 (seed 0). A partial trailing block has no key. Two prompts
share block i's key exactly when they share the model, the salt and every token
of blocks 0..i, so a key names a whole prefix, not one block.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import xxhash

DEFAULT_BLOCK_SIZE = 16


def root_hash(model: str, cache_salt: str = "") -> int:
    """The chain's seed for one model and tenant."""
    return xxhash.xxh3_64_intdigest(model.encode() + b"\x00" + cache_salt.encode())


def block_hashes(
    token_ids: Sequence[int],
    block_size: int = DEFAULT_BLOCK_SIZE,
    model: str = "",
    cache_salt: str = "",
    parent: int | None = None,
) -> list[int]:
    """Keys of every full block of ``token_ids`` (a partial last block has none).

    ``parent`` continues a chain from a known key instead of the root.
    """
    if block_size < 1:
        raise ValueError("block_size must be >= 1")
    h = root_hash(model, cache_salt) if parent is None else parent
    arr = np.asarray(token_ids, dtype="<u4")
    prefix = h.to_bytes(8, "little")
    out: list[int] = []
    for start in range(0, len(arr) - block_size + 1, block_size):
        h = xxhash.xxh3_64_intdigest(prefix + arr[start : start + block_size].tobytes())
        prefix = h.to_bytes(8, "little")
        out.append(h)
    return out
