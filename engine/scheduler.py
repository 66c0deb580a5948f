"""Continuous batching with chunked prefill, as one token budget per step.

There is no prefill phase or decode phase: each request has ``num_computed_tokens`` and
``num_tokens``; a step gives each scheduled request some of the difference. Running requests go first
(decodes cost one token each, unfinished prefills continue in chunks), then waiting requests are
admitted while budget, sequence slots and blocks last. When blocks run out for a running request, the
newest running request is preempted (its blocks freed, recomputed later from the prefix cache).
A running request may carry draft tokens (speculative decoding): they are scheduled right after its
known tokens, so the step verifies them, and they are the first thing given up when blocks run short.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from engine.config import SchedulerConfig
from engine.kv_cache.manager import KVCacheManager
from engine.request import Request, RequestStatus


@dataclass(frozen=True)
class ScheduledRequest:
    request: Request
    num_new_tokens: int  # tokens [num_computed_tokens, num_computed_tokens + num_new_tokens) run this step

    @property
    def samples(self) -> bool:
        """True when this step reaches the end of the known tokens, so its last row yields a token."""
        r = self.request
        return r.num_computed_tokens + self.num_new_tokens >= r.num_tokens

    @property
    def num_spec_tokens(self) -> int:
        """Draft tokens computed (and so verified) by this step: the rows past the known tokens."""
        r = self.request
        return max(0, r.num_computed_tokens + self.num_new_tokens - r.num_tokens)

    @property
    def num_logits_rows(self) -> int:
        """Rows whose logits this step needs: the last known token's, plus one per draft token."""
        return 1 + self.num_spec_tokens if self.samples else 0


@dataclass(frozen=True)
class ScheduledBatch:
    requests: tuple[ScheduledRequest, ...]
    preempted: tuple[str, ...] = ()

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.requests)

    @property
    def has_spec(self) -> bool:
        """True when some request verifies draft tokens this step (its logits go to the verifier)."""
        return any(s.num_spec_tokens for s in self.requests)

    @property
    def is_empty(self) -> bool:
        return not self.requests


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager) -> None:
        self.config = config
        self.kv = kv
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.chunk_cap = config.long_prefill_token_threshold or config.max_num_batched_tokens

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        budget = self.config.max_num_batched_tokens
        scheduled: list[ScheduledRequest] = []
        preempted: list[str] = []

        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = min(req.num_tokens_with_spec - req.num_computed_tokens, budget, self.chunk_cap)
            while not self.kv.allocate_slots(req, n):
                if req.spec_token_ids:  # speculation is optional: give it up before preempting anyone
                    req.spec_token_ids = []
                    n = min(req.num_tokens - req.num_computed_tokens, budget, self.chunk_cap)
                    continue
                victim = self.running.pop()
                self._preempt(victim)
                preempted.append(victim.request_id)
                if victim is req:
                    break
            else:
                scheduled.append(ScheduledRequest(req, n))
                budget -= n
                i += 1
                continue
            break  # the request itself was preempted: everything after it is gone too

        # Admit waiting requests unless this step had to preempt (no room to spare).
        while self.waiting and budget > 0 and not preempted and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            cached = self.kv.find_cached_prefix(req) if req.num_computed_tokens == 0 else []
            start = max(req.num_computed_tokens, len(cached) * self.kv.block_size)
            n = min(req.num_tokens - start, budget, self.chunk_cap)
            if not self.kv.allocate_slots(req, n, cached):
                break
            self.waiting.popleft()
            self.running.append(req)
            req.transition(RequestStatus.RUNNING)
            scheduled.append(ScheduledRequest(req, n))
            budget -= n
        return ScheduledBatch(tuple(scheduled), tuple(preempted))

    def _preempt(self, req: Request) -> None:
        req.spec_token_ids = []
        req.transition(RequestStatus.PREEMPTED)
        self.kv.free(req)
        req.num_preemptions += 1
        self.waiting.appendleft(req)

    def add_running(self, req: Request) -> None:
        """A request that already holds its blocks (decode side: KV received, or prefilling locally)."""
        self.running.append(req)

    def remove(self, req: Request) -> None:
        """Stop scheduling ``req`` but keep its blocks (the caller still needs its KV)."""
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)

    def finish(self, req: Request) -> None:
        """Remove a finished or aborted request and free its blocks (exactly once)."""
        self.remove(req)
        self.kv.free(req)
