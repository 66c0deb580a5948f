"""Paged KV cache bookkeeping: block pool with reference counts, prefix cache, per-request tables."""

from engine.kv_cache.block_pool import BlockPool, KVCacheEvent
from engine.kv_cache.hashing import hash_block_tokens, hash_prompt_blocks, root_hash
from engine.kv_cache.manager import KVCacheManager

__all__ = [
    "BlockPool",
    "KVCacheEvent",
    "KVCacheManager",
    "hash_block_tokens",
    "hash_prompt_blocks",
    "root_hash",
]
