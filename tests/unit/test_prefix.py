"""The prefix identity that worker and gateway share: pinned by an independent implementation."""

from __future__ import annotations

import struct

import pytest
import xxhash

from kvmesh.prefix import block_hashes, root_hash


def reference(tokens: list[int], block_size: int, model: str, salt: str) -> list[int]:
    """DESIGN.md's definition, written out with struct instead of numpy."""
    h = xxhash.xxh3_64_intdigest(model.encode() + b"\x00" + salt.encode())
    out = []
    for i in range(len(tokens) // block_size):
        block = tokens[i * block_size : (i + 1) * block_size]
        h = xxhash.xxh3_64_intdigest(struct.pack("<Q", h) + struct.pack(f"<{block_size}I", *block))
        out.append(h)
    return out


@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_matches_the_written_definition(block_size):
    tokens = [(i * 7919) % 128256 for i in range(100)]
    assert block_hashes(tokens, block_size, "llama", "t") == reference(tokens, block_size, "llama", "t")


def test_a_key_names_the_whole_prefix_model_and_tenant():
    a = block_hashes(list(range(48)), 16, "m", "")
    b = block_hashes([*range(16), 99, *range(17, 48)], 16, "m", "")
    assert a[0] == b[0] and a[1] != b[1] and a[2] != b[2]  # a change in block 1 changes every later key
    assert block_hashes(list(range(16)), 16, "m", "other") != a[:1]
    assert block_hashes(list(range(16)), 16, "other-model", "") != a[:1]


def test_partial_blocks_have_no_key_and_chains_continue_from_a_parent():
    tokens = list(range(40))
    full = block_hashes(tokens, 16, "m")
    assert len(full) == 2
    assert block_hashes(tokens[16:32], 16, parent=full[0]) == full[1:]
    assert root_hash("m") != root_hash("m", "salt")


def test_block_size_must_be_positive():
    with pytest.raises(ValueError):
        block_hashes([1, 2, 3], 0)
