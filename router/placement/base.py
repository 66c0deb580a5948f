"""The placement store contract: worker registry + block-hash index, shared by every router replica.

Two implementations pass one contract test suite: ``EmbeddedPlacementStore`` (in-process, for the
one-command mode and tests) and ``RedisPlacementStore`` (shared by all router replicas).

Invariants every implementation keeps:

- A worker is *live* from ``register``/``heartbeat`` until ``ttl_s`` seconds after the latest of them
  (or ``deregister``). Only live workers are listed; an expired worker's block index is dropped with it.
- ``register`` is a fresh start (a restarted worker has an empty cache): it clears the worker's block
  index and KV-event sequence. ``heartbeat`` refreshes load and TTL and keeps the index.
- KV events of one worker are applied in ``sequence`` order: an event whose sequence is not above the
  last applied one is a duplicate and ignored; a gap (events were lost) clears that worker's index
  before the event is applied, because a lost removal would otherwise leave a false hit forever.
  Within one event, removals are applied before stores (the event reports the worker's end state).
- ``longest_prefix`` counts, per candidate, how many leading hashes of the chain the worker holds
  (stopping at the first miss): chained hashes mean block ``i`` is only useful with blocks ``< i``.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from router.hashing import HASH_SIZE


class WorkerRole(enum.StrEnum):
    PREFILL = "prefill"
    DECODE = "decode"


@dataclass(frozen=True)
class WorkerRecord:
    """One worker as the registry knows it: identity, compatibility and current load."""

    worker_id: str
    role: WorkerRole
    address: str  # gRPC host:port
    model_fingerprint: str
    block_size: int
    num_total_blocks: int
    num_free_blocks: int
    num_running: int = 0
    num_waiting: int = 0
    model_name: str = ""
    max_model_len: int = 0
    kv_transfer_address: str = ""

    def __post_init__(self) -> None:
        if not self.worker_id or any(c.isspace() for c in self.worker_id):
            raise ValueError(f"worker_id must be a non-empty token without whitespace: {self.worker_id!r}")
        if self.block_size <= 0:
            raise ValueError(f"block_size must be positive: {self.block_size}")
        for name in ("num_total_blocks", "num_free_blocks", "num_running", "num_waiting", "max_model_len"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0: {getattr(self, name)}")
        object.__setattr__(self, "role", WorkerRole(self.role))


@dataclass(frozen=True)
class KVEventBatch:
    """Prefix-cache changes of one worker (the domain form of ``baton.v1.KVEvent``)."""

    worker_id: str
    sequence: int
    stored_block_hashes: tuple[bytes, ...] = ()
    removed_block_hashes: tuple[bytes, ...] = ()
    all_blocks_cleared: bool = False
    model_fingerprint: str = ""
    # Not validated against the index: a parent that was evicted meanwhile is normal.
    parent_block_hash: bytes | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.sequence < 0:
            raise ValueError(f"sequence must be >= 0: {self.sequence}")
        for h in (*self.stored_block_hashes, *self.removed_block_hashes):
            if not isinstance(h, bytes) or len(h) != HASH_SIZE:
                raise ValueError(f"block hashes must be {HASH_SIZE} raw bytes")


class PlacementStore(Protocol):
    """Worker registry and block-hash index. All methods are safe to call concurrently."""

    async def register(self, worker: WorkerRecord, ttl_s: float) -> None:
        """Add or replace ``worker`` as a fresh start (clears its block index and event sequence)."""
        ...

    async def heartbeat(self, worker: WorkerRecord, ttl_s: float) -> bool:
        """Refresh load and TTL, keeping the index. Returns False when the worker was not live (its
        index, if any, is gone: it should re-announce its cache or accept misses)."""
        ...

    async def deregister(self, worker_id: str) -> None:
        """Remove the worker and its index now (draining or shut down)."""
        ...

    async def live_workers(self) -> list[WorkerRecord]:
        """Every live worker, sorted by ``worker_id``."""
        ...

    async def apply_kv_event(self, event: KVEventBatch) -> bool:
        """Apply one event. Returns False when ignored (unknown/expired worker, fingerprint mismatch,
        or a duplicate sequence)."""
        ...

    async def longest_prefix(
        self, block_hashes: Sequence[bytes], candidates: Sequence[str]
    ) -> dict[str, int]:
        """``{worker_id: number of leading blocks of the chain it holds}`` for every candidate
        (0 for unknown ones)."""
        ...

    async def close(self) -> None: ...
