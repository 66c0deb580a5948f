"""The chained prefix block hash shared by the router and the engine's prefix cache.

Spec (both sides must produce identical bytes, or prefix routing silently misses):

    fingerprint_bytes = model_fingerprint.encode("utf-8")
    h_0 = sha256(fingerprint_bytes)                                  # the seed, not a block hash
    h_i = sha256(h_{i-1} || le_int32(tokens[(i-1)*B : i*B]))         # i = 1 .. floor(len(tokens) / B)

where ``B`` is the block size, ``||`` is byte concatenation, ``le_int32`` packs each token id as a
little-endian signed 32-bit integer, and every digest is the raw 32-byte SHA-256 digest (not hex).
Only FULL blocks are hashed: a trailing partial block has no hash. The returned chain is
``[h_1, ..., h_n]``; ``h_i`` identifies the whole prefix ``tokens[: i*B]`` under this model, so two
prompts share ``h_i`` exactly when they share their first ``i`` blocks (and the fingerprint).

Seeding by the fingerprint (model, dtype, block size, KV layout version) keeps blocks computed under
a different configuration from ever matching. Python's ``hash()`` is never used: it is salted per
process and not collision-resistant.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

HASH_SIZE = 32  # bytes of one SHA-256 digest
_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1


def seed_hash(model_fingerprint: str) -> bytes:
    """``h_0``: the chain's seed for one model fingerprint."""
    return hashlib.sha256(model_fingerprint.encode("utf-8")).digest()


def next_block_hash(parent: bytes, block_token_ids: Sequence[int]) -> bytes:
    """``h_i`` from ``h_{i-1}`` and the ``B`` token ids of block ``i``."""
    ids = list(block_token_ids)
    for token_id in ids:
        if not _INT32_MIN <= token_id <= _INT32_MAX:
            raise ValueError(f"token id {token_id} does not fit in int32")
    return hashlib.sha256(parent + struct.pack(f"<{len(ids)}i", *ids)).digest()


def block_hashes(model_fingerprint: str, token_ids: Sequence[int], block_size: int) -> list[bytes]:
    """``[h_1, ..., h_n]`` for the ``n = len(token_ids) // block_size`` full blocks of ``token_ids``."""
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    parent = seed_hash(model_fingerprint)
    chain: list[bytes] = []
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = next_block_hash(parent, token_ids[start : start + block_size])
        chain.append(parent)
    return chain
