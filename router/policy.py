"""Pairing policies: which decode worker D, and which prefill worker P (or none), serve a request.

A policy is a pure function of a snapshot (``PairingInput``), so it is testable without a cluster:
``place()`` builds the snapshot from the placement store and asks the policy.

- ``RoundRobinPolicy``: rotate over P and over D.
- ``LeastLoadedPolicy``: fewest running + waiting requests; D ties broken by free blocks.
- ``CacheAwarePolicy``: P maximizes ``cached prefix tokens - queue_penalty_tokens * queued requests``
  (the prefill work it saves minus the work queued ahead of it); D maximizes free KV headroom minus
  load. When D would have fewer than ``local_prefill_threshold`` uncached tokens to prefill itself, no P
  is used (the KV transfer would cost more than it saves).

Every policy only pairs workers whose fingerprint equals the router's (``eligible``) and, when it can,
only decode workers with enough free blocks for the prompt. Ties break on ``worker_id`` so decisions
are deterministic.
"""

from __future__ import annotations

import itertools
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from router.backend import BackendError, BackendErrorKind
from router.hashing import block_hashes
from router.placement.base import PlacementStore, WorkerRecord, WorkerRole


@dataclass(frozen=True)
class PairingInput:
    prompt_len: int
    block_size: int
    prefill: Sequence[WorkerRecord]  # eligible prefill workers
    decode: Sequence[WorkerRecord]  # eligible decode workers, never empty
    cached_blocks: Mapping[str, int] = field(default_factory=dict)  # worker id -> leading blocks cached

    def cached_tokens(self, worker_id: str) -> int:
        # The last prompt token is always recomputed (its logits sample the first output token).
        return min(self.cached_blocks.get(worker_id, 0) * self.block_size, max(self.prompt_len - 1, 0))

    def blocks_needed(self) -> int:
        return -(-self.prompt_len // self.block_size)


@dataclass(frozen=True)
class Pairing:
    decode: WorkerRecord
    prefill: WorkerRecord | None  # None: D prefills locally
    expected_cached_tokens: int = 0  # on the worker that runs the prompt, per the store


class PairingPolicy(Protocol):
    name: str
    uses_prefix_cache: bool  # whether ``cached_blocks`` must be looked up

    def choose(self, inp: PairingInput) -> Pairing: ...


def eligible(
    workers: Sequence[WorkerRecord], fingerprint: str
) -> tuple[list[WorkerRecord], list[WorkerRecord]]:
    """(prefill, decode) workers that may exchange KV with this router's model."""
    ok = sorted((w for w in workers if w.model_fingerprint == fingerprint), key=lambda w: w.worker_id)
    return [w for w in ok if w.role == WorkerRole.PREFILL], [w for w in ok if w.role == WorkerRole.DECODE]


def _with_room(inp: PairingInput) -> Sequence[WorkerRecord]:
    roomy = [d for d in inp.decode if d.num_free_blocks >= inp.blocks_needed()]
    return roomy or inp.decode  # none fits: let Reserve refuse with a clear error


def _load(w: WorkerRecord) -> int:
    return w.num_running + w.num_waiting


class RoundRobinPolicy:
    name = "round_robin"
    uses_prefix_cache = False

    def __init__(self, local_prefill_threshold: int = 0) -> None:
        self.local_prefill_threshold = local_prefill_threshold
        self._p = itertools.count()
        self._d = itertools.count()

    def choose(self, inp: PairingInput) -> Pairing:
        decode = inp.decode[next(self._d) % len(inp.decode)]
        if not inp.prefill or inp.prompt_len < self.local_prefill_threshold:
            return Pairing(decode, None)
        return Pairing(decode, inp.prefill[next(self._p) % len(inp.prefill)])


class LeastLoadedPolicy:
    name = "least_loaded"
    uses_prefix_cache = False

    def __init__(self, local_prefill_threshold: int = 0) -> None:
        self.local_prefill_threshold = local_prefill_threshold

    def choose(self, inp: PairingInput) -> Pairing:
        decode = min(_with_room(inp), key=lambda d: (_load(d), -d.num_free_blocks, d.worker_id))
        if not inp.prefill or inp.prompt_len < self.local_prefill_threshold:
            return Pairing(decode, None)
        return Pairing(decode, min(inp.prefill, key=lambda p: (_load(p), p.worker_id)))


class CacheAwarePolicy:
    name = "cache_aware"
    uses_prefix_cache = True

    def __init__(
        self,
        local_prefill_threshold: int = 64,
        queue_penalty_tokens: int = 256,
        decode_load_weight: float = 0.5,
    ) -> None:
        self.local_prefill_threshold = local_prefill_threshold
        self.queue_penalty_tokens = queue_penalty_tokens
        self.decode_load_weight = decode_load_weight

    def choose(self, inp: PairingInput) -> Pairing:
        candidates = _with_room(inp)
        max_load = max(_load(d) for d in candidates) or 1

        def decode_score(d: WorkerRecord) -> float:
            headroom = d.num_free_blocks / max(d.num_total_blocks, 1)
            return headroom - self.decode_load_weight * _load(d) / max_load

        decode = min(candidates, key=lambda d: (-decode_score(d), d.worker_id))
        local_cached = inp.cached_tokens(decode.worker_id)
        if not inp.prefill or inp.prompt_len - local_cached < self.local_prefill_threshold:
            return Pairing(decode, None, local_cached)

        def prefill_score(p: WorkerRecord) -> float:
            return inp.cached_tokens(p.worker_id) - self.queue_penalty_tokens * _load(p)

        prefill = min(inp.prefill, key=lambda p: (-prefill_score(p), p.worker_id))
        return Pairing(decode, prefill, inp.cached_tokens(prefill.worker_id))


POLICIES = {p.name: p for p in (RoundRobinPolicy, LeastLoadedPolicy, CacheAwarePolicy)}


def make_policy(name: str, local_prefill_threshold: int) -> PairingPolicy:
    """``name`` as in ``POLICIES``; the settings' spelling (``cache-aware``) is accepted too."""
    try:
        cls = POLICIES[name.replace("-", "_")]
    except KeyError:
        raise ValueError(f"unknown pairing policy {name!r}; choose one of {sorted(POLICIES)}") from None
    return cls(local_prefill_threshold=local_prefill_threshold)


async def place(
    store: PlacementStore,
    policy: PairingPolicy,
    fingerprint: str,
    block_size: int,
    prompt_ids: Sequence[int],
    exclude: Collection[str] = (),
) -> Pairing:
    """Snapshot the cluster from ``store`` and let ``policy`` pick, skipping ``exclude`` (workers that
    just failed this request). Raises UNAVAILABLE when no decode worker is left."""
    live = [w for w in await store.live_workers() if w.worker_id not in exclude]
    prefill, decode = eligible(live, fingerprint)
    if not decode:
        raise BackendError(BackendErrorKind.UNAVAILABLE, "no decode worker serving this model is registered")
    cached: dict[str, int] = {}
    if policy.uses_prefix_cache:
        chain = block_hashes(fingerprint, prompt_ids, block_size)
        if chain:
            cached = await store.longest_prefix(chain, [w.worker_id for w in (*prefill, *decode)])
    return policy.choose(PairingInput(len(prompt_ids), block_size, prefill, decode, cached))
