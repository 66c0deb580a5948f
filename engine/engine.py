"""The aggregated engine: ``step() = schedule -> execute -> update``.

Prefill and decode workers reuse the same pieces (scheduler, KV cache manager, runner) with their own
policies around them; this class is the single-process loop behind ``LLM`` and ``baton generate``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from engine.config import EngineConfig
from engine.kv_cache.manager import KVCacheManager
from engine.metrics import EngineMetrics
from engine.request import FinishReason, Request, RequestStatus
from engine.runner import ModelRunner, StepOutput
from engine.sampling.params import SamplingParams
from engine.scheduler import Scheduler
from engine.step_trace import step_shape


@dataclass(frozen=True)
class RequestOutput:
    """What one step produced for one request (a delta, not the whole history)."""

    request_id: str
    new_token_ids: tuple[int, ...]
    new_logprobs: tuple
    finished: bool
    finish_reason: FinishReason | None
    num_prompt_tokens: int
    num_cached_tokens: int


def check_stop(req: Request, token: int, max_model_len: int) -> FinishReason | None:
    """Why ``req`` ends after appending ``token``, or None. Stop strings are handled on text, above."""
    s = req.sampling
    n_out = len(req.output_token_ids)
    if n_out >= s.min_tokens:
        if not s.ignore_eos and token in req.eos_token_ids:
            return FinishReason.STOP
        if token in s.stop_token_ids:
            return FinishReason.STOP
    if n_out >= s.max_tokens or req.num_tokens >= max_model_len:
        return FinishReason.LENGTH
    return None


class LLMEngine:
    def __init__(
        self,
        config: EngineConfig,
        runner: ModelRunner,
        kv: KVCacheManager,
        eos_token_ids: tuple[int, ...],
        spec=None,
    ) -> None:
        """``spec``: an ``engine.spec_decode.SpecDecoder`` (speculative decoding), or None."""
        self.config = config
        self.runner = runner
        self.kv = kv
        self.scheduler = Scheduler(config.scheduler, kv)
        self.eos_token_ids = eos_token_ids
        self.requests: dict[str, Request] = {}
        self.max_model_len = config.max_model_len
        self.hold_blocks_on_finish = False
        self.fingerprint = ""
        self.metrics = EngineMetrics()  # counters of what the scheduler ran (engine/metrics.py)
        self.step_trace = None  # engine.step_trace.StepTrace: one timing line per step (diagnosis)
        # Requests whose KV arrived while a lookahead step was in flight: they join the batch after
        # the next step (see start_reserved). RUNNING, holding their blocks, not yet in the scheduler.
        self._joining: list[Request] = []
        self.spec = None
        if spec is not None:
            self.set_spec(spec)

    def set_spec(self, spec) -> None:
        """Turn speculative decoding on (a ``SpecDecoder``) or off (None). Only while idle."""
        if self.scheduler.has_work():
            raise RuntimeError("change speculative decoding only while no request is running")
        if spec is not None:
            spec.bind(self)
        self.spec = spec

    @property
    def spec_stats(self) -> dict | None:
        """Cumulative speculative-decoding counters (``engine.metrics.SPEC_DECODE_KEYS`` and more)."""
        return self.spec.metrics.snapshot() if self.spec is not None else None

    def add_request(self, request_id: str, prompt_token_ids: list[int], sampling: SamplingParams) -> Request:
        if request_id in self.requests:
            raise ValueError(f"duplicate request id {request_id!r}")
        self._check_prompt(prompt_token_ids)
        req = Request(request_id, list(prompt_token_ids), sampling, eos_token_ids=self.eos_token_ids)
        self.requests[request_id] = req
        self.scheduler.add(req)
        return req

    def _check_prompt(self, prompt_token_ids: list[int]) -> None:
        if not prompt_token_ids:
            raise ValueError("prompt is empty")
        if len(prompt_token_ids) >= self.max_model_len:
            raise ValueError(
                f"prompt has {len(prompt_token_ids)} tokens; the context is {self.max_model_len}"
            )
        need = self.kv.blocks_needed(len(prompt_token_ids) + 1)
        if need > self.kv.pool.num_blocks:
            raise ValueError(f"prompt needs {need} KV blocks; the cache has {self.kv.pool.num_blocks}")

    def abort(self, request_id: str, *, hold_blocks: bool = False) -> Request | None:
        """Abort a request; returns it, or None when it is unknown or already finished.

        ``hold_blocks``: its blocks stay allocated, because a KV transfer may still read from or write
        into them; the caller hands them back with ``free_held`` once nothing can. Its id is free
        for a new request at once.
        """
        req = self.requests.pop(request_id, None)
        if req is None or req.is_finished:
            return None
        if req.status in (RequestStatus.WAITING_FOR_KV, RequestStatus.SENDING_KV):
            if not hold_blocks:
                self.kv.free(req)  # not in the scheduler's queues
        else:
            self._forget_joining(req)
            if hold_blocks:
                self.scheduler.remove(req)
            else:
                self.scheduler.finish(req)
        if self.spec is not None:
            self.spec.forget(req)
        req.transition(RequestStatus.ABORTED)
        req.finish_reason = FinishReason.ABORT
        return req

    def free_held(self, req: Request) -> None:
        """Free the blocks of a request aborted with ``hold_blocks`` (exactly once)."""
        self.kv.free(req)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work() or bool(self._joining)

    def step(self) -> list[RequestOutput]:
        start = time.perf_counter()
        if self.spec is not None:
            self.spec.propose()  # draft tokens for running decodes, before the scheduler sizes them
        return self._step(start)

    def _step(self, start: float) -> list[RequestOutput]:
        """Schedule, execute, update. ``start``: when the step began (speculation and the trace use it)."""
        batch = self.scheduler.schedule()
        self.metrics.on_schedule(batch)  # before the empty check: a step may only preempt
        if batch.is_empty:
            return self._admit_joining()
        traced = step_shape(batch) if self.step_trace is not None else None  # before the update moves it on
        t0 = time.perf_counter()
        if self.spec is not None:  # what the step costs depends on (measured for the spec policy)
            reqs = batch.requests
            shape = (
                len(reqs),
                batch.num_tokens,
                sum(1 for s in reqs if s.num_spec_tokens),
                all(s.samples for s in reqs),
            )
            decode_only = all(s.num_new_tokens - s.num_spec_tokens == 1 and s.samples for s in reqs)
        # Lookahead decoding (runner) pays when the next step is this one again: not while requests
        # wait to be admitted, nor with speculation (whose steps change shape). The lookahead step
        # writes each decode's next position: its block is taken now (when one is free), not next step.
        # Requests about to join end it too: this step is the last of the current batch.
        lookahead = (
            self.runner.can_look_ahead
            and self.spec is None
            and not self.scheduler.waiting
            and not self._joining
        )
        if lookahead:
            for s in batch.requests:
                if s.num_new_tokens == 1 and s.samples:
                    self.kv.allocate_slots(s.request, 2)
        out = self.runner.execute(batch, lookahead=lookahead)
        results = self._update(batch, out)
        results += self._admit_joining()
        end = time.perf_counter()
        if self.spec is not None:
            self.spec.observe(*shape, end - t0)
            if decode_only:
                self.spec.observe_outcome(sum(len(o.new_token_ids) for o in results), end - start)
        if traced is not None:
            self.step_trace.record(
                *traced, start, end, len(self.scheduler.running), len(self.scheduler.waiting)
            )
        return results

    def _update(self, batch, out: StepOutput) -> list[RequestOutput]:
        # A verification step returns logits, not tokens: the spec decoder turns them into tokens
        # (it reads the scheduled draft counts, so before any request changes).
        verified = self.spec.verify(batch, out.logits) if out.logits is not None else {}
        results = []
        for s in batch.requests:
            req = s.request
            # Draft positions count as computed only once accepted (below).
            req.num_computed_tokens = min(req.num_computed_tokens + s.num_new_tokens, req.num_tokens)
            req.spec_token_ids = []
            if req.request_id in verified:
                tokens, logprobs = verified[req.request_id]
            elif req.request_id in out.sampled:
                tokens, logprobs = [out.sampled[req.request_id]], [out.logprobs.get(req.request_id)]
            else:
                self.kv.register_computed_blocks(req)
                continue
            reason = None
            n = 0
            for token, lp in zip(tokens, logprobs, strict=True):
                req.output_token_ids.append(token)
                req.output_logprobs.append(lp)
                n += 1
                reason = check_stop(req, token, self.max_model_len)
                if reason is not None:
                    break  # tokens after a stop (or past max_tokens) are discarded
            # Every emitted token but the last is an accepted draft whose KV this step wrote.
            req.num_computed_tokens += n - 1
            self.kv.register_computed_blocks(req)
            if reason is not None:
                self.finish(req, reason)
            results.append(
                RequestOutput(
                    req.request_id,
                    tuple(tokens[:n]),
                    tuple(logprobs[:n]),
                    reason is not None,
                    reason,
                    req.num_prompt_tokens,
                    req.num_cached_tokens,
                )
            )
        return results

    def finish(self, req: Request, reason: FinishReason) -> None:
        """End ``req`` (e.g. EOS, or a stop string found by the caller) and free its blocks.

        With ``hold_blocks_on_finish`` (prefill workers) the blocks stay pinned and the request moves
        to SENDING_KV until ``release()``: its KV must not be evicted before the decode side has it."""
        if req.is_finished or req.status == RequestStatus.SENDING_KV:
            return
        req.finish_reason = reason
        if self.spec is not None:
            self.spec.forget(req)
        if self.hold_blocks_on_finish and req.status == RequestStatus.RUNNING:
            self.scheduler.remove(req)
            req.transition(RequestStatus.SENDING_KV)
            return
        self._forget_joining(req)
        self.scheduler.finish(req)
        req.transition(RequestStatus.FINISHED)
        self.requests.pop(req.request_id, None)

    def release(self, req: Request) -> None:
        """Free the pinned blocks of a SENDING_KV request (its transfer ended, either way)."""
        if req.status != RequestStatus.SENDING_KV:
            return
        self.kv.free(req)
        req.transition(RequestStatus.FINISHED)
        self.requests.pop(req.request_id, None)

    # --- decode-side admission of requests whose prompt KV arrives from elsewhere ---------------
    def reserve(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling: SamplingParams,
        output_token_ids: list[int] = (),
    ) -> Request | None:
        """Create a WAITING_FOR_KV request holding blocks for its whole prompt (cached prefix first).
        Returns None, changing nothing, when the blocks are not there."""
        if request_id in self.requests:
            raise ValueError(f"duplicate request id {request_id!r}")
        self._check_prompt(prompt_token_ids)
        req = Request(
            request_id,
            list(prompt_token_ids),
            sampling,
            eos_token_ids=self.eos_token_ids,
            status=RequestStatus.WAITING_FOR_KV,
        )
        req.output_token_ids = list(output_token_ids)
        cached = self.kv.find_cached_prefix(req)
        start = len(cached) * self.kv.block_size
        if not self.kv.allocate_slots(req, req.num_tokens - start, cached):
            return None
        self.requests[request_id] = req
        return req

    def start_reserved(
        self, req: Request, first_token: int | None = None, first_logprob=None
    ) -> RequestOutput | None:
        """Begin decoding a reserved request. With ``first_token`` (sampled by the prefill worker) the
        prompt's KV has landed: every prompt token counts as computed. Without it the prompt (minus the
        cached prefix) is prefilled here, in chunks, like any request.

        Returns the request's first output (no tokens: the first one came from the prefill worker),
        or None when it comes from a later step: always with a local prefill, and when a lookahead
        step is in flight. That step computes the current batch's next tokens already; adding a row
        now would throw it away and make every stream wait for it and then for the step that
        replaces it (two steps' time). So the request joins after that step instead (``_joining``),
        and its first output comes with that step's outputs: it decodes one step later, and the
        others keep the step in flight (only the step it joins runs without a lookahead)."""
        if first_token is None:
            req.transition(RequestStatus.RUNNING)
            self.scheduler.add_running(req)
            return None
        req.num_computed_tokens = req.num_tokens
        req.output_token_ids.append(first_token)
        req.output_logprobs.append(first_logprob)
        req.transition(RequestStatus.RUNNING)
        self.kv.register_computed_blocks(req)
        reason = check_stop(req, first_token, self.max_model_len)
        if reason is None and self.runner.lookahead_pending():
            self._joining.append(req)
            return None
        self.scheduler.add_running(req)
        if reason is not None:
            self.finish(req, reason)
        return self._joined(req, reason)

    def _joined(self, req: Request, reason: FinishReason | None = None) -> RequestOutput:
        """The tokenless output that tells a reserved request's caller it is decoding (or finished)."""
        return RequestOutput(
            req.request_id, (), (), reason is not None, reason, req.num_prompt_tokens, req.num_cached_tokens
        )

    def _admit_joining(self) -> list[RequestOutput]:
        """Move the requests waiting to join into the batch; their first outputs."""
        joining, self._joining = self._joining, []
        for req in joining:
            self.scheduler.add_running(req)
        return [self._joined(req) for req in joining]

    def _forget_joining(self, req: Request) -> None:
        if req in self._joining:
            self._joining.remove(req)

    def drop_reserved(self, req: Request) -> None:
        """Abort a reservation that never started (transfer failed, deadline passed, client gone)."""
        if req.status == RequestStatus.WAITING_FOR_KV:
            self.kv.free(req)
            req.transition(RequestStatus.ABORTED)
            req.finish_reason = FinishReason.ABORT
            self.requests.pop(req.request_id, None)

    def check_integrity(self) -> None:
        self.kv.check_integrity()
        if self.spec is not None:
            self.spec.check_integrity()
