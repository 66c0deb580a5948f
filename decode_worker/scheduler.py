"""Decode policy on top of the engine: bounded reservations for incoming KV, then continuous batching.

A reservation holds blocks for a prompt whose KV a prefill worker is pushing (or that will be
prefilled here). It is bounded in number and in blocks (``Reserve`` refuses when full) and in time:
a reservation whose Decode never started is dropped at its deadline and its blocks freed. Once the
KV landed (receiver SUCCESS) the request joins the running batch with its first token.

Runs on the engine loop thread, except the release of a reservation that ends before its KV landed:
bytes may still be arriving into its blocks, and the receiver's release then waits for them (up to
RELEASE_WAIT_S) and may cut the sender off, which would stall every running stream. That release
runs on its own thread; the blocks return to the pool on the loop thread once it returned.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from engine.engine import LLMEngine
from engine.request import Request, RequestStatus
from kv_transfer.base import KVReceiver, TransferHandle, release_then


@dataclass
class Reservation:
    req: Request
    handle: TransferHandle | None
    deadline: float  # time.time() based; dropped if not started by then
    started: bool = False
    created: float = field(default_factory=time.monotonic)  # start of the KV transfer-time measurement


class Refused(Exception):
    def __init__(self, code: str, message: str, retryable: bool = True) -> None:
        super().__init__(message)
        self.code = code
        self.retryable = retryable


class Reservations:
    def __init__(
        self,
        engine: LLMEngine,
        receiver: KVReceiver,
        max_reservations: int,
        headroom_blocks: int,
        post: Callable[[Callable[[], object]], object],
    ) -> None:
        """``post(fn)``: run ``fn`` on the engine loop thread, soon (from any thread)."""
        self.engine = engine
        self.receiver = receiver
        self.post = post
        self.max_reservations = max_reservations
        self.headroom_blocks = headroom_blocks
        self.by_id: dict[str, Reservation] = {}

    def reserve(self, request_id: str, prompt_ids: list[int], sampling, output_ids: list[int], deadline: float) -> Reservation:
        pending = sum(1 for r in self.by_id.values() if not r.started)
        if pending >= self.max_reservations:
            raise Refused("RESOURCE_EXHAUSTED", f"{pending} reservations pending (limit {self.max_reservations})")
        kv = self.engine.kv
        need = kv.blocks_needed(len(prompt_ids) + len(output_ids))
        if need + self.headroom_blocks > kv.num_free_blocks:
            raise Refused("RESOURCE_EXHAUSTED", f"need {need} KV blocks, {kv.num_free_blocks} free")
        req = self.engine.reserve(request_id, prompt_ids, sampling, output_ids)
        if req is None:
            raise Refused("RESOURCE_EXHAUSTED", f"need {need} KV blocks, {kv.num_free_blocks} free")
        bs = kv.block_size
        n_prompt_blocks = -(-len(prompt_ids) // bs)
        first = min(req.num_cached_tokens // bs, n_prompt_blocks)
        try:
            handle = self.receiver.reserve(request_id, req.block_ids[first:n_prompt_blocks], len(prompt_ids), deadline, first_block_index=first)
        except Exception:
            self.engine.drop_reserved(req)
            raise
        res = Reservation(req, handle, deadline)
        self.by_id[request_id] = res
        return res

    def start(self, request_id: str, first_token: int | None, first_logprob) -> Reservation:
        res = self.by_id.get(request_id)
        if res is None or res.req.status != RequestStatus.WAITING_FOR_KV:
            raise Refused("NOT_FOUND", f"no pending reservation for request {request_id!r}", retryable=False)
        res.started = True
        if first_token is None and res.handle is not None:
            self.receiver.release(res.handle)  # prefilling locally: no KV will come
            res.handle = None
        return res

    def end(self, request_id: str) -> None:
        """Forget a reservation; frees its blocks if it never started. Idempotent.

        A reservation whose KV may still be arriving leaves the engine's request table at once and
        keeps its blocks until the receiver's release returned (off this thread; see the module)."""
        res = self.by_id.pop(request_id, None)
        if res is None:
            return
        handle, res.handle = res.handle, None
        if res.req.status == RequestStatus.WAITING_FOR_KV and handle is not None:
            held = self.engine.abort(request_id, hold_blocks=True)
            assert held is res.req  # a WAITING_FOR_KV request leaves the engine only through here
            release_then(self.receiver.release, handle, lambda: self.post(lambda: self.engine.free_held(held)))
            return
        if handle is not None:
            self.receiver.release(handle)
        if res.req.status == RequestStatus.WAITING_FOR_KV:
            self.engine.drop_reserved(res.req)
        elif not res.req.is_finished:
            self.engine.abort(request_id)

    def expire(self) -> bool:
        """Drop reservations whose Decode never started in time. Returns True if any remain pending."""
        now = time.time()
        for rid, res in list(self.by_id.items()):
            if not res.started and now > res.deadline:
                self.end(rid)
            elif res.req.is_finished:
                self.by_id.pop(rid, None)
        return False
