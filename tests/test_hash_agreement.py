"""The router and the engine compute the same chained block hashes (routing for cache hits relies on it)."""

import random

from engine.kv_cache.hashing import hash_prompt_blocks
from router.hashing import block_hashes


def test_router_and_engine_block_hashes_agree():
    rng = random.Random(0)
    for block_size in (1, 4, 16):
        tokens = [rng.randrange(0, 200_000) for _ in range(rng.randint(0, 100))]
        assert block_hashes("fp-x", tokens, block_size) == hash_prompt_blocks("fp-x", tokens, block_size)
    assert block_hashes("a", list(range(32)), 16) != block_hashes("b", list(range(32)), 16)
