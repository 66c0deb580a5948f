"""EngineHost: an engine running on its own thread, as a serving worker needs it.

Shared by the prefill and decode workers (they share code only through ``engine``). It adds to the
engine loop: per-request output queues, a sequenced log of prefix-cache events for the placement
store, and a stats snapshot. Policy (what to send where, when to reserve) stays in the workers,
which run their own code on the loop thread through ``call()`` and the ``after_step`` hook.
"""

from __future__ import annotations

import queue
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from engine.engine import LLMEngine, RequestOutput
from engine.loop import EngineLoop
from engine.metrics import (
    QUEUE_TIME_BUCKETS_S,
    TRANSFER_TIME_BUCKETS_S,
    HistogramSnapshot,
    KVTransferMetrics,
    KVTransferSnapshot,
    SpecDecodeSnapshot,
    spec_decode_snapshot,
)
from engine.step_trace import StepTrace

MAX_EVENT_BATCHES = 4096  # a poller further behind than this sees a gap and resynchronises
# The engine loop is busy Python that rarely blocks, so other threads of a worker (KV transfer,
# gRPC) get the GIL only when the interpreter forces a switch: every 5 ms by default. A KV piece
# needs several such hand-offs, so at the default a decode worker under load receives a few pieces
# per second. Forced switches every 0.5 ms keep those threads responsive at a negligible cost.
WORKER_SWITCH_INTERVAL_S = 0.0005


@dataclass(frozen=True)
class KVEventBatch:
    """Prefix-cache changes of one step. ``sequence`` increases by one per batch, per worker."""

    sequence: int
    stored: tuple[bytes, ...]
    parent: bytes | None
    removed: tuple[bytes, ...]
    timestamp: float


@dataclass(frozen=True)
class EngineStats:
    num_running: int
    num_waiting: int
    num_total_blocks: int
    num_free_blocks: int
    kv_cache_usage: float
    prefix_cache_queries: int  # tokens looked up
    prefix_cache_hits: int  # tokens found
    num_preemptions: int
    num_finished_requests: int
    num_generated_tokens: int
    num_prompt_tokens: int  # of requests when first scheduled (engine/metrics.py)
    queue_time: HistogramSnapshot = HistogramSnapshot.empty(QUEUE_TIME_BUCKETS_S)  # seconds
    spec_decode: SpecDecodeSnapshot = SpecDecodeSnapshot()
    kv_transfer: KVTransferSnapshot = KVTransferSnapshot(
        0, 0, HistogramSnapshot.empty(TRANSFER_TIME_BUCKETS_S)
    )


class EngineHost:
    def __init__(
        self, engine: LLMEngine, name: str = "engine", kv_transfer: KVTransferMetrics | None = None
    ) -> None:
        self.engine = engine
        # The worker records its KV transfers here (prefill: sent, decode: received); stats() reports them.
        self.kv_transfer = kv_transfer if kv_transfer is not None else KVTransferMetrics()
        self.after_step: Callable[[], bool] | None = None  # worker hook; returns True while it has work
        self._queues: dict[str, queue.Queue[RequestOutput]] = {}
        self._lock = threading.Lock()
        self._events: deque[KVEventBatch] = deque(maxlen=MAX_EVENT_BATCHES)
        self._next_seq = 1
        self._finished = 0
        self._generated = 0
        self._device_set = False
        self.loop = EngineLoop(self._step, name=f"{name}-loop")
        if engine.step_trace is None:
            engine.step_trace = StepTrace.from_env(name)  # BATON_STEP_TRACE (engine/step_trace.py)

    def start(self) -> None:
        sys.setswitchinterval(min(sys.getswitchinterval(), WORKER_SWITCH_INTERVAL_S))
        self.loop.start()

    def stop(self) -> None:
        self.loop.stop()
        if self.engine.step_trace is not None and not self.loop.alive:
            self.engine.step_trace.close()

    # --- outputs -----------------------------------------------------------------------------
    def subscribe(self, request_id: str) -> queue.Queue[RequestOutput]:
        q: queue.Queue[RequestOutput] = queue.Queue()
        with self._lock:
            self._queues[request_id] = q
        return q

    def unsubscribe(self, request_id: str) -> None:
        with self._lock:
            self._queues.pop(request_id, None)

    def deliver(self, out: RequestOutput) -> None:
        with self._lock:
            q = self._queues.get(out.request_id)
        if q is not None:
            q.put(out)

    # --- the loop ----------------------------------------------------------------------------
    def _step(self) -> bool:
        if not self._device_set:
            # CUDA's current device is per thread: kernels of a worker on cuda:1 must launch on cuda:1.
            device = self.engine.runner.kv_cache.device
            if device.type == "cuda":
                import torch

                torch.cuda.set_device(device)
            self._device_set = True
        busy = False
        if self.engine.has_unfinished():
            batch_outputs = self.engine.step()
            for out in batch_outputs:
                self._generated += len(out.new_token_ids)
                if out.finished:
                    self._finished += 1
                self.deliver(out)
            busy = True
        if self.after_step is not None:
            busy = self.after_step() or busy
        self._collect_events()
        return busy or self.engine.has_unfinished()

    def _collect_events(self) -> None:
        events = self.engine.kv.drain_events()
        if not events:
            return
        stored = tuple(e.block_hash for e in events if e.kind == "stored")
        removed = tuple(e.block_hash for e in events if e.kind == "removed")
        first_parent = next((e.parent_hash for e in events if e.kind == "stored"), None)
        with self._lock:
            self._events.append(KVEventBatch(self._next_seq, stored, first_parent, removed, time.time()))
            self._next_seq += 1

    def events_after(self, sequence: int) -> list[KVEventBatch]:
        """Event batches with a sequence above ``sequence``, oldest first."""
        with self._lock:
            return [b for b in self._events if b.sequence > sequence]

    def stats(self) -> EngineStats:
        eng = self.engine
        kv = eng.kv
        return EngineStats(
            num_running=len(eng.scheduler.running),
            num_waiting=len(eng.scheduler.waiting),
            num_total_blocks=kv.pool.num_blocks,
            num_free_blocks=kv.num_free_blocks,
            kv_cache_usage=kv.pool.usage(),
            prefix_cache_queries=kv.prefix_queries_tokens,
            prefix_cache_hits=kv.prefix_hit_tokens,
            num_preemptions=eng.metrics.num_preemptions,
            num_finished_requests=self._finished,
            num_generated_tokens=self._generated,
            num_prompt_tokens=eng.metrics.num_prompt_tokens,
            queue_time=eng.metrics.queue_time.snapshot(),
            spec_decode=spec_decode_snapshot(eng),
            kv_transfer=self.kv_transfer.snapshot(),
        )
