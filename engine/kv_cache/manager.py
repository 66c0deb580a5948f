"""Per-request KV block tables on top of the block pool, with prefix-cache lookups.

Invariants:
  * ``request.block_ids`` covers at least ``request.num_computed_tokens`` tokens (ceil-div block size).
  * ``request.block_hashes[i]`` is the chained hash of full block ``i`` of the request's known tokens.
  * The first ``request.num_registered_blocks`` blocks are computed, full and in the prefix index.
  * A prefix hit never covers the last prompt token, so every admitted request computes at least one
    token and samples from real logits.
"""

from __future__ import annotations

from engine.kv_cache.block_pool import BlockPool, KVCacheEvent
from engine.kv_cache.hashing import hash_block_tokens, root_hash
from engine.request import Request


class KVCacheManager:
    def __init__(
        self, num_blocks: int, block_size: int, fingerprint: str, enable_prefix_caching: bool = True
    ) -> None:
        self.block_size = block_size
        self.pool = BlockPool(num_blocks, enable_prefix_caching)
        self._root = root_hash(fingerprint)
        self.enable_prefix_caching = enable_prefix_caching
        # Counters for metrics (tokens, as vLLM counts them).
        self.prefix_queries_tokens = 0
        self.prefix_hit_tokens = 0

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def update_hashes(self, req: Request) -> None:
        """Extend ``req.block_hashes`` over every full block of its known tokens."""
        bs = self.block_size
        full = req.num_tokens // bs
        if len(req.block_hashes) >= full:
            return  # the usual decode step: no new full block, so no O(context) token copy
        tokens = req.all_token_ids
        for i in range(len(req.block_hashes), full):
            parent = req.block_hashes[-1] if req.block_hashes else self._root
            req.block_hashes.append(hash_block_tokens(parent, tokens[i * bs : (i + 1) * bs]))

    def find_cached_prefix(self, req: Request) -> list[int]:
        """Block ids of the longest cached prefix of ``req`` (not yet referenced)."""
        if not self.enable_prefix_caching:
            return []
        self.update_hashes(req)
        max_blocks = (req.num_tokens - 1) // self.block_size
        hits: list[int] = []
        for h in req.block_hashes[:max_blocks]:
            block = self.pool.lookup(h)
            if block is None:
                break
            hits.append(block)
        self.prefix_queries_tokens += req.num_tokens
        self.prefix_hit_tokens += len(hits) * self.block_size
        return hits

    def allocate_slots(
        self, req: Request, num_new_tokens: int, cached_blocks: list[int] | None = None
    ) -> bool:
        """Make room for ``num_new_tokens`` more computed tokens. On a fresh request, ``cached_blocks``
        are taken from the prefix cache first. Returns False (changing nothing) when blocks run out."""
        cached_blocks = cached_blocks or []
        num_cached_tokens = len(cached_blocks) * self.block_size
        total = max(req.num_computed_tokens, num_cached_tokens) + num_new_tokens
        need = self.blocks_needed(total) - len(req.block_ids) - len(cached_blocks)
        # Cached blocks that are evictable count as free; taking them must not be double counted.
        evictable_hits = sum(1 for b in cached_blocks if self.pool.ref_count(b) == 0)
        if need > self.pool.num_free_blocks - evictable_hits:
            return False
        if cached_blocks:
            self.pool.touch(cached_blocks)
            req.block_ids.extend(cached_blocks)
            req.num_computed_tokens = num_cached_tokens
            req.num_cached_tokens = num_cached_tokens
            req.num_registered_blocks = len(cached_blocks)
        if need > 0:
            req.block_ids.extend(self.pool.allocate(need))
        return True

    def register_computed_blocks(self, req: Request) -> None:
        """Publish newly completed full blocks to the prefix cache (call after ``num_computed_tokens`` grows)."""
        self.update_hashes(req)
        full = min(req.num_computed_tokens // self.block_size, len(req.block_hashes))
        for i in range(req.num_registered_blocks, full):
            parent = req.block_hashes[i - 1] if i > 0 else None
            self.pool.cache_block(req.block_ids[i], req.block_hashes[i], parent)
        req.num_registered_blocks = max(req.num_registered_blocks, full)

    def free(self, req: Request) -> None:
        """Release every block of ``req`` (idempotent). Cached blocks stay reusable until evicted."""
        if req.block_ids:
            self.pool.free(req.block_ids)
        req.block_ids = []
        req.num_registered_blocks = 0
        req.num_computed_tokens = 0

    def drain_events(self) -> list[KVCacheEvent]:
        return self.pool.drain_events()

    def check_integrity(self) -> None:
        self.pool.check_integrity()
