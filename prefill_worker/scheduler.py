"""Prefill policy on top of the engine: chunked prefill, and KV shipped as soon as blocks complete.

Each request carries a transfer handle (the decode worker's reserved blocks), or gets it while its
prompt computes (``set_target``: the decode worker's Reserve then overlaps the prefill; nothing is
sent before it, and what completed meanwhile goes at the next step's end). After every engine step
``PrefillTransfers.after_step`` sends the blocks that became full since the last step, so transfer
overlaps the next chunk's compute. The step that completes a prompt also samples its first token,
and reading that token back waits for the whole step; so the rest of the prompt's KV (tail block and
done marker included) is sent from ``on_launched`` as soon as that step is queued, and its host-side
cost (header, the receiver posting its receives) hides behind the step's compute. Blocks stay pinned
(request in SENDING_KV) until the decode side acknowledged everything, then return to the prefix cache.

Runs on the engine loop thread, except the sender's release of a transfer that ended in failure:
its sends may still read the blocks, and that release waits for them (up to RELEASE_WAIT_S). It runs
on its own thread; the request leaves the engine at once and its blocks return once it returned.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from engine.engine import LLMEngine
from engine.metrics import KVTransferMetrics
from engine.request import Request, RequestStatus
from engine.scheduler import ScheduledBatch
from kv_transfer import diag
from kv_transfer.base import KVSender, TransferHandle, TransferState, release_then

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
    handle: TransferHandle | None  # None until a target that follows arrives
    deadline: float  # time.time() based
    # Settled once the first token is sampled (its outcome, transfer not known yet), or with the
    # job's failure if it ends before that. ``result`` settles only once the decode side holds the KV.
    first: Future = field(default_factory=Future)
    result: Future = field(default_factory=Future)
    sent_upto: int = 0  # prompt blocks [0, sent_upto) are sent (or cached on the decode side)
    last_sent: bool = False
    blocks_sent: int = 0
    send_error: Exception | None = None  # a send from on_launched failed; after_step ends the job
    # time.monotonic() marks, for the request's trace and the transfer-time histogram.
    admitted: float = field(default_factory=time.monotonic)
    first_send: float | None = None
    prompt_done: float | None = None


class PrefillTransfers:
    def __init__(
        self,
        engine: LLMEngine,
        sender: KVSender,
        kv_cache,
        post: Callable[[Callable[[], object]], object],
        metrics: KVTransferMetrics | None = None,
    ) -> None:
        """``post(fn)``: run ``fn`` on the engine loop thread, soon (from any thread)."""
        self.engine = engine
        self.sender = sender
        self.post = post
        self.kv_cache = kv_cache
        # The early sends' gathers (or sends straight from a block-major cache) queue here, after the
        # step's forward, beside its sampling kernels.
        self._side = torch.cuda.Stream(kv_cache.device) if kv_cache.device.type == "cuda" else None
        self.metrics = metrics if metrics is not None else KVTransferMetrics()
        self.jobs: dict[str, _Job] = {}
        self._last_after_step = time.perf_counter()

    def add(self, req: Request, handle: TransferHandle | None, deadline: float) -> tuple[Future, Future]:
        """Track ``req``'s transfer; ``(first token, KV delivered)`` futures of ``PrefillOutcome``.

        ``handle`` None: the target follows (``set_target``) before ``deadline``. Either way the job
        ends by the target's own deadline too."""
        if handle is None:
            job = _Job(req, None, deadline)
        else:
            job = _Job(req, handle, min(deadline, handle.deadline), sent_upto=handle.first_block_index)
        self.jobs[req.request_id] = job
        return job.first, job.result

    def set_target(self, request_id: str, handle: TransferHandle) -> bool:
        """Give a tracked request its target (checked by the caller); False when it is not tracked."""
        job = self.jobs.get(request_id)
        if job is None:
            return False
        if job.handle is not None:
            raise ValueError(f"request {request_id!r} already has a KV target")
        job.handle, job.sent_upto = handle, handle.first_block_index
        job.deadline = min(job.deadline, handle.deadline)
        return True

    def num_prompt_tokens(self, request_id: str) -> int | None:
        """The prompt length of a tracked request, else None."""
        job = self.jobs.get(request_id)
        return None if job is None else job.req.num_prompt_tokens

    def cancel(self, request_id: str, reason: str) -> bool:
        job = self.jobs.pop(request_id, None)
        if job is None:
            return False
        self._end(job, PrefillFailed("ABORTED", reason, retryable=False))
        return True

    def on_launched(self, batch: ScheduledBatch) -> None:
        """The engine queued ``batch``'s forward: send the rest of every prompt it completes.

        Runs inside the engine step, so it never ends a job (that would abort a request mid-step): a
        failed send is kept on the job and ``after_step`` ends it.
        """
        completing = []
        for s in batch.requests:
            job = self.jobs.get(s.request.request_id)
            req = s.request
            if job is None or job.handle is None:
                continue
            if not job.last_sent and req.num_computed_tokens + s.num_new_tokens >= req.num_prompt_tokens:
                completing.append(job)
        if not completing:
            return
        stream = self._side
        if stream is not None:
            stream.wait_stream(torch.cuda.current_stream(stream.device))  # reads after the forward
        # Outside inference mode, as after_step's sends: staging buffers made here are reused there.
        with torch.inference_mode(False), torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            for job in completing:
                try:
                    self._send(job, self._prompt_blocks(job.req), last=True)
                except Exception as e:  # noqa: BLE001  (ended by after_step, with its message)
                    job.send_error = e

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
        req = job.req
        if req.status == RequestStatus.ABORTED:
            self.jobs.pop(req.request_id, None)
            self._end(job, PrefillFailed("ABORTED", "aborted", retryable=False))
            return
        prompt_done = req.status == RequestStatus.SENDING_KV
        bs = self.engine.kv.block_size
        upto = self._prompt_blocks(req) if prompt_done else min(req.num_computed_tokens, req.num_prompt_tokens) // bs
        if prompt_done and job.prompt_done is None:
            job.prompt_done = time.monotonic()
            job.first.set_result(self._outcome(job, job.prompt_done, transfer_s=0.0))
        if job.send_error is not None:
            raise job.send_error
        if job.handle is not None and not job.last_sent and (upto > job.sent_upto or prompt_done):
            self._send(job, upto, last=prompt_done)
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

    def _prompt_blocks(self, req: Request) -> int:
        """Blocks the prompt occupies, its partial tail block included."""
        return -(-req.num_prompt_tokens // self.engine.kv.block_size)

    def _send(self, job: _Job, upto: int, last: bool) -> None:
        """Send prompt blocks ``[job.sent_upto, upto)`` (``last``: and the done marker)."""
        src = job.req.block_ids[job.sent_upto : upto]
        if job.first_send is None:
            job.first_send = time.monotonic()
        job.last_sent = last  # even if the send fails: nothing more is sent for this job
        self.sender.send(job.handle, src, self.kv_cache, dst_block_offset=job.sent_upto - job.handle.first_block_index, last=last)
        job.blocks_sent += len(src)
        job.sent_upto = max(upto, job.sent_upto)

    def _end(self, job: _Job, failure: PrefillFailed | None) -> None:
        self._let_go(job, failed=failure is not None)
        now = time.monotonic()
        transfer_s = now - job.first_send if job.first_send is not None else 0.0
        if failure is None:
            self.metrics.on_success(transfer_s, job.blocks_sent * job.handle.layout.block_bytes)
            outcome = self._outcome(job, now, transfer_s)
        elif failure.code == "TRANSFER_FAILED" or (failure.code == "DEADLINE_EXCEEDED" and job.first_send is not None):
            self.metrics.on_failure()  # an abort, or a deadline before any KV moved, is no transfer failure
        for future in (job.first, job.result):
            if future.done():
                continue
            if failure is None:
                future.set_result(outcome)
            else:
                future.set_exception(failure)

    def _let_go(self, job: _Job, failed: bool) -> None:
        """Release the job's transfer and end its request in the engine, blocks back to the pool.

        After a failure, sends may still be reading the blocks (a stalled receiver): the release
        would wait for them (up to RELEASE_WAIT_S) and stall every prompt computing here, so it runs
        on a thread of its own and the blocks stay held until it returned.
        """
        req = job.req
        if failed and job.handle is not None:
            held = self.engine.abort(req.request_id, hold_blocks=True)  # None: the engine freed them
            release_then(self.sender.release, job.handle, lambda: self._free_later(held))
            return
        if job.handle is not None:
            self.sender.release(job.handle)  # every block acknowledged: no send reads them any more
        if req.status == RequestStatus.SENDING_KV:
            self.engine.release(req)  # blocks back to the prefix cache
        else:
            self.engine.abort(req.request_id)

    def _free_later(self, held: Request | None) -> None:
        if held is not None:
            self.post(lambda: self.engine.free_held(held))

    @staticmethod
    def _outcome(job: _Job, now: float, transfer_s: float) -> PrefillOutcome:
        req = job.req
        return PrefillOutcome(
            first_token_id=req.output_token_ids[0],
            first_logprob=req.output_logprobs[0] if req.output_logprobs else None,
            num_prompt_tokens=req.num_prompt_tokens,
            num_cached_tokens=req.num_cached_tokens,
            num_transferred_blocks=job.blocks_sent,
            prefill_ms=((job.prompt_done or now) - job.admitted) * 1000,
            transfer_ms=transfer_s * 1000,
        )
