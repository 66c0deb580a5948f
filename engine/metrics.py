"""Metric collection inside a worker process: plain counters and fixed-bucket histograms.

No Prometheus here: the engine loop and the worker's threads only count. The worker turns snapshots
into ``baton.v1.WorkerStats`` (for the router) and Prometheus families (``baton/worker_metrics.py``),
so both views come from one set of numbers. Every value is cumulative since the process started
(Prometheus counter semantics; a restart resets them, which Prometheus handles).

Speculative decoding reports through a plain dict on the engine, ``engine.spec_stats``, with the keys
of ``SPEC_DECODE_KEYS`` (cumulative ints); an engine without it reports zeros.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engine.scheduler import ScheduledBatch

# Seconds. Queueing spans milliseconds (idle) to minutes (overload); transfers are usually milliseconds.
QUEUE_TIME_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)  # fmt: skip
TRANSFER_TIME_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)  # fmt: skip

SPEC_DECODE_KEYS = ("num_drafts", "num_draft_tokens", "num_accepted_tokens")


@dataclass(frozen=True)
class HistogramSnapshot:
    """Counts per bucket (not cumulative); ``bucket_counts[-1]`` counts values above the last bound."""

    upper_bounds: tuple[float, ...]
    bucket_counts: tuple[int, ...]
    sum: float
    count: int

    @classmethod
    def empty(cls, upper_bounds: tuple[float, ...]) -> HistogramSnapshot:
        return cls(upper_bounds, (0,) * (len(upper_bounds) + 1), 0.0, 0)


class Histogram:
    """Thread-safe fixed-bucket histogram. A value lands in the first bucket whose bound is >= it."""

    def __init__(self, upper_bounds: tuple[float, ...]) -> None:
        if list(upper_bounds) != sorted(set(upper_bounds)):
            raise ValueError("histogram bounds must be strictly increasing")
        self.upper_bounds = tuple(float(b) for b in upper_bounds)
        self._counts = [0] * (len(upper_bounds) + 1)
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        i = bisect.bisect_left(self.upper_bounds, value)
        with self._lock:
            self._counts[i] += 1
            self._sum += value

    def snapshot(self) -> HistogramSnapshot:
        with self._lock:
            return HistogramSnapshot(self.upper_bounds, tuple(self._counts), self._sum, sum(self._counts))


class EngineMetrics:
    """What the engine's scheduler did, recorded once per step (``on_schedule``, loop thread only).

    - ``num_prompt_tokens``: prompt tokens of requests when first scheduled (cached ones included, as
      vLLM counts them). A decode worker counts only the prompts it prefills itself: a request whose
      KV arrived from a prefill worker is never scheduled with its prompt uncomputed.
    - ``num_preemptions``: requests preempted (blocks reclaimed, recomputed later).
    - ``queue_time``: request arrival -> first scheduled.
    """

    def __init__(self) -> None:
        self.num_prompt_tokens = 0
        self.num_preemptions = 0
        self.queue_time = Histogram(QUEUE_TIME_BUCKETS_S)

    def on_schedule(self, batch: ScheduledBatch, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self.num_preemptions += len(batch.preempted)
        for scheduled in batch.requests:
            req = scheduled.request
            # First schedule: nothing computed beyond the prefix-cache hit, never preempted (a
            # preempted request starts over from its cached prefix and must not count twice).
            if req.num_computed_tokens == req.num_cached_tokens and req.num_preemptions == 0:
                self.num_prompt_tokens += req.num_prompt_tokens
                self.queue_time.observe(max(0.0, now - req.arrival_time))


@dataclass(frozen=True)
class KVTransferSnapshot:
    failures: int
    bytes: int
    time: HistogramSnapshot  # seconds per successful transfer; its count is the number of successes


class KVTransferMetrics:
    """KV transfers of one worker (prefill: sent, decode: received). Thread-safe: the prefill side
    records on the engine loop, the decode side on its gRPC threads."""

    def __init__(self) -> None:
        self.time = Histogram(TRANSFER_TIME_BUCKETS_S)
        self._failures = 0
        self._bytes = 0
        self._lock = threading.Lock()

    def on_success(self, seconds: float, num_bytes: int) -> None:
        self.time.observe(max(0.0, seconds))
        with self._lock:
            self._bytes += num_bytes

    def on_failure(self) -> None:
        with self._lock:
            self._failures += 1

    def snapshot(self) -> KVTransferSnapshot:
        with self._lock:
            failures, moved = self._failures, self._bytes
        return KVTransferSnapshot(failures, moved, self.time.snapshot())


@dataclass(frozen=True)
class SpecDecodeSnapshot:
    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    num_accepted_tokens_per_pos: tuple[int, ...] = ()  # accepted drafts at position 0, 1, ...


def spec_decode_snapshot(engine: object) -> SpecDecodeSnapshot:
    """``engine.spec_stats`` (a dict keyed by ``SPEC_DECODE_KEYS``) as a snapshot; zeros without it."""
    stats = getattr(engine, "spec_stats", None)
    if not isinstance(stats, Mapping):
        return SpecDecodeSnapshot()
    per_pos = tuple(int(n) for n in stats.get("num_accepted_tokens_per_pos", ()))
    return SpecDecodeSnapshot(*(int(stats.get(key, 0)) for key in SPEC_DECODE_KEYS), num_accepted_tokens_per_pos=per_pos)
