"""Prefill policy on top of the engine: chunked prefill, and KV shipped as soon as blocks complete.

Each request carries a transfer handle (the decode worker's reserved blocks). After every engine step
``PrefillTransfers.after_step`` sends the blocks that became full since the last step, so transfer
overlaps the next chunk's compute; once the last chunk has run (and sampled the first token) the
partial tail block and the done marker follow. Blocks stay pinned (request in SENDING_KV) until the
decode side acknowledged everything, then return to the prefix cache.

Runs on the engine loop thread only.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

from engine.engine import LLMEngine
from engine.metrics import KVTransferMetrics
from engine.request import Request, RequestStatus
from kv_transfer import diag
from kv_transfer.base import KVSender, TransferHandle, TransferState

# While only acknowledgements are outstanding the loop polls the transfer state this often: a
# finished transfer is seen up to this much later (a sleep ends ~50 us past what it asks).
ACK_POLL_S = 0.0001

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PrefillOutcome:
    first_token_id: int
    first_logprob: object  # (logprob, [(id, lp), ...]) or None
    num_prompt_tokens: int
    num_cached_tokens: int
    num_transferred_blocks: int
    prefill_ms: float = 0.0  # admitted -> prompt computed and first token sampled
    transfer_ms: float = 0.0  # first piece sent -> every block acknowledged (0: nothing to send)


class PrefillFailed(Exception):
    def __init__(self, code: str, message: str, retryable: bool) -> None:
        super().__init__(message)
        self.code = code  # ErrorCode suffix, e.g. "TRANSFER_FAILED"
        self.retryable = retryable


@dataclass
class _Job:
    req: Request
    handle: TransferHandle
    deadline: float  # time.time() based
    result: Future = field(default_factory=Future)
    sent_upto: int = 0  # prompt blocks [0, sent_upto) are sent (or cached on the decode side)
    last_sent: bool = False
    blocks_sent: int = 0
    # time.monotonic() marks, for the request's trace and the transfer-time histogram.
    admitted: float = field(default_factory=time.monotonic)
    first_send: float | None = None
    prompt_done: float | None = None


class PrefillTransfers:
    def __init__(self, engine: LLMEngine, sender: KVSender, kv_cache, metrics: KVTransferMetrics | None = None) -> None:
        self.engine = engine
        self.sender = sender
        self.kv_cache = kv_cache
        self.metrics = metrics if metrics is not None else KVTransferMetrics()
        self.jobs: dict[str, _Job] = {}
        self._last_after_step = time.perf_counter()

    def add(self, req: Request, handle: TransferHandle, deadline: float) -> Future:
        job = _Job(req, handle, deadline, sent_upto=handle.first_block_index)
        self.jobs[req.request_id] = job
        return job.result

    def cancel(self, request_id: str, reason: str) -> bool:
        job = self.jobs.pop(request_id, None)
        if job is None:
            return False
        self._end(job, PrefillFailed("ABORTED", reason, retryable=False))
        return True

    def after_step(self) -> bool:
        now = time.time()
        t0 = time.perf_counter()
        for job in list(self.jobs.values()):
            try:
                self._advance(job, now)
            except Exception as e:  # a transport error ends this request, never the worker
                log.warning("prefill %s: transfer error: %s", job.req.request_id, e)
                self.jobs.pop(job.req.request_id, None)
                self._end(job, PrefillFailed("TRANSFER_FAILED", f"KV transfer failed: {e}", retryable=True))
        if diag.ENABLED and self.jobs:
            t1 = time.perf_counter()
            diag.trace("P", "after_step", since_last_ms=1e3 * (t0 - self._last_after_step), took_ms=1e3 * (t1 - t0), jobs=len(self.jobs))
            self._last_after_step = t1
        if self.jobs and not self.engine.has_unfinished():
            time.sleep(ACK_POLL_S)  # only acknowledgements outstanding: poll gently
        return bool(self.jobs)

    def _advance(self, job: _Job, now: float) -> None:
        req, bs = job.req, self.engine.kv.block_size
        if req.status == RequestStatus.ABORTED:
            self.jobs.pop(req.request_id, None)
            self._end(job, PrefillFailed("ABORTED", "aborted", retryable=False))
            return
        n_prompt_blocks = -(-req.num_prompt_tokens // bs)
        prompt_done = req.status == RequestStatus.SENDING_KV
        upto = n_prompt_blocks if prompt_done else min(req.num_computed_tokens, req.num_prompt_tokens) // bs
        if prompt_done and job.prompt_done is None:
            job.prompt_done = time.monotonic()
        if not job.last_sent and (upto > job.sent_upto or prompt_done):
            src = req.block_ids[job.sent_upto : upto]
            if job.first_send is None:
                job.first_send = time.monotonic()
            self.sender.send(job.handle, src, self.kv_cache, dst_block_offset=job.sent_upto - job.handle.first_block_index, last=prompt_done)
            job.blocks_sent += len(src)
            job.sent_upto = max(upto, job.sent_upto)
            job.last_sent = prompt_done
        if job.last_sent:
            state = self.sender.poll(job.handle)
            if state == TransferState.SUCCESS:
                self.jobs.pop(req.request_id, None)
                self._end(job, None)
                return
            if state == TransferState.FAILED:
                self.jobs.pop(req.request_id, None)
                why = self.sender.error(job.handle) or "transfer failed"
                self._end(job, PrefillFailed("TRANSFER_FAILED", why, retryable=True))
                return
        if now > job.deadline:
            self.jobs.pop(req.request_id, None)
            self._end(job, PrefillFailed("DEADLINE_EXCEEDED", "prefill deadline passed", retryable=True))

    def _end(self, job: _Job, failure: PrefillFailed | None) -> None:
        req = job.req
        self.sender.release(job.handle)
        now = time.monotonic()
        transfer_s = now - job.first_send if job.first_send is not None else 0.0
        if failure is None:
            self.metrics.on_success(transfer_s, job.blocks_sent * job.handle.layout.block_bytes)
            outcome = PrefillOutcome(
                first_token_id=req.output_token_ids[0],
                first_logprob=req.output_logprobs[0] if req.output_logprobs else None,
                num_prompt_tokens=req.num_prompt_tokens,
                num_cached_tokens=req.num_cached_tokens,
                num_transferred_blocks=job.blocks_sent,
                prefill_ms=((job.prompt_done or now) - job.admitted) * 1000,
                transfer_ms=transfer_s * 1000,
            )
        elif failure.code == "TRANSFER_FAILED" or (failure.code == "DEADLINE_EXCEEDED" and job.first_send is not None):
            self.metrics.on_failure()  # an abort, or a deadline before any KV moved, is no transfer failure
        if req.status == RequestStatus.SENDING_KV:
            self.engine.release(req)  # blocks back to the prefix cache
        else:
            self.engine.abort(req.request_id)
        if not job.result.done():
            if failure is None:
                job.result.set_result(outcome)
            else:
                job.result.set_exception(failure)
