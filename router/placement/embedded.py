"""In-process placement store: the one-command mode and tests. Thread- and task-safe.

State lives in plain dicts guarded by one ``threading.Lock`` (no awaits while holding it). Liveness
uses a monotonic clock (injectable for tests), so wall-clock jumps never expire a worker.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from router.placement.base import KVEventBatch, WorkerRecord


@dataclass
class _Entry:
    record: WorkerRecord
    expires_at: float
    blocks: set[bytes] = field(default_factory=set)
    last_sequence: int | None = None


class EmbeddedPlacementStore:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._workers: dict[str, _Entry] = {}

    def _live_entry(self, worker_id: str) -> _Entry | None:
        """The entry if live; drops it when expired. Caller holds the lock."""
        entry = self._workers.get(worker_id)
        if entry is not None and entry.expires_at <= self._clock():
            del self._workers[worker_id]
            return None
        return entry

    async def register(self, worker: WorkerRecord, ttl_s: float) -> None:
        _check_ttl(ttl_s)
        with self._lock:
            self._workers[worker.worker_id] = _Entry(worker, self._clock() + ttl_s)

    async def heartbeat(self, worker: WorkerRecord, ttl_s: float) -> bool:
        _check_ttl(ttl_s)
        with self._lock:
            entry = self._live_entry(worker.worker_id)
            if entry is None:
                self._workers[worker.worker_id] = _Entry(worker, self._clock() + ttl_s)
                return False
            entry.record = worker
            entry.expires_at = self._clock() + ttl_s
            return True

    async def deregister(self, worker_id: str) -> None:
        with self._lock:
            self._workers.pop(worker_id, None)

    async def live_workers(self) -> list[WorkerRecord]:
        with self._lock:
            live = [e.record for wid in list(self._workers) if (e := self._live_entry(wid)) is not None]
        return sorted(live, key=lambda r: r.worker_id)

    async def apply_kv_event(self, event: KVEventBatch) -> bool:
        with self._lock:
            entry = self._live_entry(event.worker_id)
            if entry is None:
                return False
            if event.model_fingerprint and event.model_fingerprint != entry.record.model_fingerprint:
                return False
            last = entry.last_sequence
            if last is not None and event.sequence <= last:
                return False
            if (last is not None and event.sequence > last + 1) or event.all_blocks_cleared:
                entry.blocks.clear()
            entry.last_sequence = event.sequence
            entry.blocks.difference_update(event.removed_block_hashes)
            entry.blocks.update(event.stored_block_hashes)
            return True

    async def longest_prefix(
        self, block_hashes: Sequence[bytes], candidates: Sequence[str]
    ) -> dict[str, int]:
        out: dict[str, int] = {}
        with self._lock:
            for worker_id in candidates:
                entry = self._live_entry(worker_id)
                blocks = entry.blocks if entry is not None else set()
                n = 0
                for h in block_hashes:
                    if h not in blocks:
                        break
                    n += 1
                out[worker_id] = n
        return out

    async def close(self) -> None:
        return None


def _check_ttl(ttl_s: float) -> None:
    if not ttl_s > 0:
        raise ValueError(f"ttl_s must be positive, got {ttl_s}")
