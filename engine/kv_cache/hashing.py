"""The chained prefix-block hash. The router computes exactly the same chain (router/hashing.py).

    h_0 = sha256(fingerprint.encode("utf-8"))                       (the model fingerprint seeds it)
    h_i = sha256(h_{i-1} || token ids of block i as little-endian int32)

Only FULL blocks are hashed. A block's hash therefore names its tokens *and* everything before
them, so equal hashes mean equal KV. Never Python's ``hash()`` (salted per process, collides).
"""

from __future__ import annotations

import hashlib
import sys
from array import array
from collections.abc import Sequence


def root_hash(fingerprint: str) -> bytes:
    return hashlib.sha256(fingerprint.encode("utf-8")).digest()


def hash_block_tokens(parent: bytes, token_ids: Sequence[int]) -> bytes:
    packed = array("i", token_ids)
    if sys.byteorder != "little":
        packed.byteswap()
    return hashlib.sha256(parent + packed.tobytes()).digest()


def hash_prompt_blocks(fingerprint: str, token_ids: Sequence[int], block_size: int) -> list[bytes]:
    """Hashes of every full block of ``token_ids``, in order."""
    hashes: list[bytes] = []
    parent = root_hash(fingerprint)
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hash_block_tokens(parent, token_ids[start : start + block_size])
        hashes.append(parent)
    return hashes
