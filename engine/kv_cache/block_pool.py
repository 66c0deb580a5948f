"""Block pool: reference counts, a free queue, and the prefix cache (hash -> block) with LRU eviction.

Every block is in exactly one of three states:
  free       ref_count == 0, no hash          (in ``_free``)
  referenced ref_count  > 0                   (owned by one or more requests; may also be cached)
  cached     ref_count == 0, has a hash       (in ``_evictable``; reusable by a prefix hit until evicted)
``check_integrity()`` asserts free + referenced + cached == total, and that the index agrees.

KV events (stored / removed block hashes) are queued for the worker to publish to the placement store.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass


@dataclass(frozen=True)
class KVCacheEvent:
    kind: str  # "stored" | "removed"
    block_hash: bytes
    parent_hash: bytes | None = None


class BlockPool:
    def __init__(self, num_blocks: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self._ref = [0] * num_blocks
        self._hash: list[bytes | None] = [None] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._evictable: OrderedDict[int, None] = OrderedDict()  # LRU order: oldest first
        self._by_hash: dict[bytes, int] = {}
        self.events: list[KVCacheEvent] = []

    # --- queries -----------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation can take right now (truly free + evictable cached)."""
        return len(self._free) + len(self._evictable)

    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def lookup(self, block_hash: bytes) -> int | None:
        return self._by_hash.get(block_hash)

    def ref_count(self, block_id: int) -> int:
        return self._ref[block_id]

    # --- transitions -------------------------------------------------------------------------
    def allocate(self, n: int) -> list[int]:
        """Take ``n`` blocks (free first, then evict LRU cached ones). All or nothing."""
        if n > self.num_free_blocks:
            raise MemoryError(f"need {n} KV blocks, only {self.num_free_blocks} free")
        out = []
        for _ in range(n):
            if self._free:
                block = self._free.popleft()
            else:
                block, _ = self._evictable.popitem(last=False)
                self._uncache(block)
            self._ref[block] = 1
            out.append(block)
        return out

    def touch(self, block_ids: list[int]) -> None:
        """Take a reference on cached/referenced blocks (a prefix-cache hit)."""
        for b in block_ids:
            if self._ref[b] == 0:
                if b not in self._evictable:
                    raise RuntimeError(f"block {b} is free, not cached: cannot reuse it")
                del self._evictable[b]
            self._ref[b] += 1

    def free(self, block_ids: list[int]) -> None:
        """Drop one reference per block. Freed in reverse so a sequence's tail is evicted first."""
        for b in reversed(block_ids):
            if self._ref[b] <= 0:
                raise RuntimeError(f"double free of block {b}")
            self._ref[b] -= 1
            if self._ref[b] == 0:
                if self._hash[b] is not None:
                    self._evictable[b] = None
                else:
                    self._free.append(b)

    def cache_block(self, block_id: int, block_hash: bytes, parent_hash: bytes | None) -> None:
        """Publish a full, computed block under its hash. No-op if the hash is already cached."""
        if not self.enable_prefix_caching or self._hash[block_id] is not None or block_hash in self._by_hash:
            return
        self._hash[block_id] = block_hash
        self._by_hash[block_hash] = block_id
        self.events.append(KVCacheEvent("stored", block_hash, parent_hash))

    def reset_prefix_cache(self) -> None:
        for b in list(self._evictable):
            del self._evictable[b]
            self._uncache(b)
            self._free.append(b)

    def _uncache(self, block: int) -> None:
        h = self._hash[block]
        if h is not None:
            del self._by_hash[h]
            self._hash[block] = None
            self.events.append(KVCacheEvent("removed", h))

    def drain_events(self) -> list[KVCacheEvent]:
        events, self.events = self.events, []
        return events

    # --- invariants --------------------------------------------------------------------------
    def check_integrity(self) -> None:
        referenced = sum(1 for r in self._ref if r > 0)
        free, cached = len(self._free), len(self._evictable)
        if free + referenced + cached != self.num_blocks:
            raise AssertionError(
                f"block leak: free {free} + referenced {referenced} + cached {cached} != {self.num_blocks}"
            )
        if any(self._ref[b] != 0 or self._hash[b] is not None for b in self._free):
            raise AssertionError("a free block is referenced or hashed")
        if any(self._ref[b] != 0 or self._hash[b] is None for b in self._evictable):
            raise AssertionError("an evictable block is referenced or unhashed")
        if any(self._hash[b] != h for h, b in self._by_hash.items()):
            raise AssertionError("prefix index disagrees with block hashes")
