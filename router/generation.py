"""One request's generation: n backend streams in, text deltas out.

Each choice (one backend sequence) has its own incremental detokenizer and stop-string matcher. The
router ends a choice itself when a stop string matches or ``max_tokens`` is reached, and then aborts
it on the workers. Whatever way the consumer leaves (finish, error, client disconnect = cancellation),
the ``finally`` aborts every sequence the workers may still be running.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from dataclasses import dataclass

import anyio

from baton.text import IncrementalDetokenizer
from router.backend import (
    BackendError,
    BackendErrorKind,
    FinishReason,
    GenerateRequest,
    GenerationBackend,
    TokenEvent,
)
from router.errors import RouterError
from router.metrics import RequestTracker
from router.stops import StopStringMatcher

log = logging.getLogger(__name__)

ABORT_DEADLINE_S = 5.0


@dataclass(frozen=True)
class ChoiceSpec:
    index: int  # choice index in the response
    prompt_index: int  # which prompt of a batched completions request
    request: GenerateRequest


@dataclass(frozen=True)
class TextOptions:
    stop: tuple[str, ...] = ()
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True


@dataclass(frozen=True)
class LogprobEntry:
    token_id: int
    token: str
    logprob: float
    top: tuple[tuple[int, str, float], ...] = ()  # (token id, token text, logprob), best first


@dataclass(frozen=True)
class ChoiceDelta:
    index: int
    prompt_index: int
    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[LogprobEntry, ...] = ()
    finish_reason: str | None = None  # "stop" | "length"
    stop_reason: str | int | None = None  # the matched stop string or stop token id
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0  # on a choice's first delta


class _Choice:
    def __init__(self, spec: ChoiceSpec, tokenizer, opts: TextOptions) -> None:
        self.spec = spec
        self._tokenizer = tokenizer
        self._detok = IncrementalDetokenizer(
            tokenizer, list(spec.request.prompt_token_ids), opts.skip_special_tokens
        )
        self._stops = StopStringMatcher(opts.stop, opts.include_stop_str_in_output)
        self._sampling = spec.request.sampling
        self.num_tokens = 0
        self.finished_by_backend = False
        self.finished = False
        self._first = True

    def on_event(self, ev: TokenEvent) -> ChoiceDelta:
        texts: list[str] = []
        ids: list[int] = []
        logprobs: list[LogprobEntry] = []
        finish: str | None = None
        stop_reason: str | int | None = None
        for i, token_id in enumerate(ev.token_ids):
            if self.num_tokens >= self._sampling.max_tokens:
                break  # the backend overshot its budget: drop the excess
            self.num_tokens += 1
            ids.append(token_id)
            if i < len(ev.logprobs):
                logprobs.append(self._logprob_entry(token_id, ev.logprobs[i]))
            piece = self._detok.push(token_id)
            texts.append(self._stops.push(piece, active=self.num_tokens >= self._sampling.min_tokens))
            if self._stops.matched is not None:
                finish, stop_reason = "stop", self._stops.matched
                break
        if finish is None and ev.finish_reason is not None:
            if ev.finish_reason == FinishReason.ABORT:
                raise BackendError(BackendErrorKind.UNAVAILABLE, "the request was aborted by the worker")
            self.finished_by_backend = True
            finish = ev.finish_reason.value
            stop_reason = ev.stop_token_id if ev.finish_reason == FinishReason.STOP else None
        elif finish is None and self.num_tokens >= self._sampling.max_tokens:
            finish = "length"
        if finish is not None and self._stops.matched is None:
            # End of the sequence: release held-back characters, which may still complete a stop.
            texts.append(
                self._stops.push(self._detok.flush(), active=self.num_tokens >= self._sampling.min_tokens)
            )
            if self._stops.matched is not None:
                finish, stop_reason = "stop", self._stops.matched
            else:
                texts.append(self._stops.flush())
        self.finished = finish is not None
        first, self._first = self._first, False
        return ChoiceDelta(
            index=self.spec.index,
            prompt_index=self.spec.prompt_index,
            text="".join(texts),
            token_ids=tuple(ids),
            logprobs=tuple(logprobs),
            finish_reason=finish,
            stop_reason=stop_reason,
            num_prompt_tokens=len(self.spec.request.prompt_token_ids) if first else 0,
            num_cached_tokens=ev.num_cached_tokens if first else 0,
        )

    def _logprob_entry(self, token_id: int, lp) -> LogprobEntry:
        top = tuple((tid, self._token_text(tid), value) for tid, value in lp.top)
        return LogprobEntry(token_id, self._token_text(token_id), lp.logprob, top)

    def _token_text(self, token_id: int) -> str:
        return self._tokenizer.decode([token_id], skip_special_tokens=False)


def backend_error_to_router(err: BackendError) -> RouterError:
    status = {
        BackendErrorKind.INVALID_ARGUMENT: 400,
        BackendErrorKind.OVERLOADED: 429,
        BackendErrorKind.UNAVAILABLE: 503,
        BackendErrorKind.TIMEOUT: 504,
        BackendErrorKind.INTERNAL: 500,
    }[err.kind]
    return RouterError(status, err.message, code=err.kind.value)


async def abort_quietly(backend: GenerationBackend, request_ids: Sequence[str]) -> None:
    """Abort on the workers even while the caller is being cancelled (shielded, bounded)."""
    with anyio.CancelScope(shield=True), anyio.move_on_after(ABORT_DEADLINE_S):
        for request_id in request_ids:
            try:
                await backend.abort(request_id)
            except Exception:  # abort is best effort; a dead worker frees everything anyway
                log.exception("abort of %s failed", request_id)


async def generate_choices(
    backend: GenerationBackend,
    tokenizer,
    specs: Sequence[ChoiceSpec],
    opts: TextOptions,
    tracker: RequestTracker,
    timeout_s: float,
) -> AsyncIterator[ChoiceDelta]:
    """Yields deltas of all choices as they come; every choice ends with a delta carrying
    ``finish_reason``. Raises ``RouterError`` (mapped backend failures, the request deadline)."""
    queue: asyncio.Queue[ChoiceDelta | BaseException | None] = asyncio.Queue()
    unfinished = {spec.request.request_id for spec in specs}  # may still run on a worker

    async def drive(choice: _Choice) -> None:
        request_id = choice.spec.request.request_id
        try:
            async with aclosing(backend.generate(choice.spec.request)) as events:
                async for ev in events:
                    if ev.route is not None:
                        tracker.on_route(ev.route, ev.timing)
                    delta = choice.on_event(ev)
                    if choice.finished_by_backend:
                        unfinished.discard(request_id)
                    await queue.put(delta)
                    if choice.finished:
                        break
            if not choice.finished:
                raise BackendError(
                    BackendErrorKind.INTERNAL, "the worker stream ended without a finish reason"
                )
            if request_id in unfinished:  # stopped by the router (stop string / max_tokens)
                await abort_quietly(backend, [request_id])
                unfinished.discard(request_id)
        except Exception as exc:  # forwarded to the consumer, which maps and re-raises it
            await queue.put(exc)

    choices = [_Choice(spec, tokenizer, opts) for spec in specs]
    tasks = [asyncio.create_task(drive(c)) for c in choices]
    deadline = time.monotonic() + timeout_s
    prompts_counted: set[int] = set()
    try:
        remaining = len(choices)
        while remaining:
            try:
                item = await asyncio.wait_for(queue.get(), timeout=max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                raise RouterError(
                    504, f"The request did not finish within {timeout_s:g} s.", code="timeout"
                ) from None
            if isinstance(item, BackendError):
                raise backend_error_to_router(item)
            if isinstance(item, RouterError):
                raise item
            if isinstance(item, BaseException):
                log.error("generation failed", exc_info=item)
                raise RouterError(500, "Internal error while generating.", code="internal") from item
            if item is None:
                continue
            tracker.on_tokens(item.index, len(item.token_ids))
            if item.num_prompt_tokens and item.prompt_index not in prompts_counted:
                prompts_counted.add(item.prompt_index)  # n choices share one prompt
                tracker.on_prompt(item.num_prompt_tokens, item.num_cached_tokens)
            yield item
            if item.finish_reason is not None:
                remaining -= 1
    finally:
        for task in tasks:
            task.cancel()
        with anyio.CancelScope(shield=True):
            await asyncio.gather(*tasks, return_exceptions=True)
        if unfinished:
            await abort_quietly(backend, sorted(unfinished))
