"""The chained prefix block hash: the spec in router/hashing.py, recomputed independently here."""

from __future__ import annotations

import hashlib
import struct

import pytest

from router.hashing import HASH_SIZE, block_hashes, next_block_hash, seed_hash


def reference(fingerprint: str, tokens: list[int], block_size: int) -> list[bytes]:
    h = hashlib.sha256(fingerprint.encode("utf-8")).digest()
    out = []
    for i in range(len(tokens) // block_size):
        block = tokens[i * block_size : (i + 1) * block_size]
        h = hashlib.sha256(h + b"".join(struct.pack("<i", t) for t in block)).digest()
        out.append(h)
    return out


def test_matches_the_spec_and_only_hashes_full_blocks() -> None:
    tokens = list(range(37))
    chain = block_hashes("fp", tokens, 8)
    assert len(chain) == 4 and all(len(h) == HASH_SIZE for h in chain)
    assert chain == reference("fp", tokens, 8)
    assert block_hashes("fp", tokens[:7], 8) == []


def test_known_vector() -> None:
    # Pinned bytes: a change here breaks prefix routing against every deployed engine.
    seed = seed_hash("abc")
    assert seed.hex() == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert next_block_hash(seed, [1, 2]) == hashlib.sha256(seed + bytes.fromhex("0100000002000000")).digest()
    assert next_block_hash(seed, [-1]) == hashlib.sha256(seed + bytes.fromhex("ffffffff")).digest()


def test_prefix_property_and_fingerprint_seeding() -> None:
    a = block_hashes("fp", [1, 2, 3, 4, 5, 6, 7, 8], 4)
    b = block_hashes("fp", [1, 2, 3, 4, 9, 9, 9, 9], 4)
    assert a[0] == b[0] and a[1] != b[1]
    assert block_hashes("other", [1, 2, 3, 4], 4)[0] != a[0]
    # The same block after a different prefix hashes differently (chained, not per block).
    assert block_hashes("fp", [5, 6, 7, 8, 5, 6, 7, 8], 4)[1] != a[1]


def test_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        block_hashes("fp", [1, 2], 0)
    with pytest.raises(ValueError):
        next_block_hash(seed_hash("fp"), [2**31])
