"""``GenerationBackend`` over the workers' gRPC services (``baton.v1`` PrefillService / DecodeService).

Per sequence (one choice):
1. ``place()`` picks decode worker D and maybe prefill worker P (policy + placement store);
2. ``DecodeService.Reserve`` on D -> KVTarget (D's blocks for the prompt); split, P's
   ``PrefillService.PrefillStream(prompt, kv_target_follows)`` starts just before it, so the prompt
   computes while D reserves, and ``SetKVTarget`` hands D's target to P (which holds the KV till then);
3. split: P's stream answers the first token (its KV still in flight), then
   ``DecodeService.Decode(first token)`` on D (which waits for the KV itself), then P's word that
   every KV block landed on D; local: ``Decode(local_prefill=True)``;
4. the Decode stream's chunks become ``TokenEvent``s until one carries a finish reason.

When the client sees a split request's first token is ``first_token_from``: ``prefill`` yields it the
moment P sampled it (the lowest TTFT; the gap to the second token then spans the KV handoff and D's
next step boundary), ``decode`` holds it until D's stream starts (its first chunk: the request has
joined D's batch), so every gap the client sees is one of D's steps, at the price of that handoff in TTFT.

Every call has a deadline. A full worker (RESOURCE_EXHAUSTED: no blocks or reservation slots now) is
backpressure, not a fault: the sequence is placed on another worker, and when every worker is full it
waits (backing off) and tries them all again, for up to ``overload_wait_s``; such tries are not
attempts. Any other retryable failure (worker unavailable, KV transfer failed) re-places the sequence
without the failed worker, at most ``max_attempts`` times; if tokens were
already streamed, the new D resumes from prompt + those tokens (``ReserveRequest.output_token_ids``)
with a local prefill, so the client sees one uninterrupted stream. Anything else becomes a
``BackendError`` with a clear message. Leaving the iterator early (cancellation, the router's stop
strings) aborts the sequence on the workers that may hold it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace

import grpc

from baton.grpc_auth import aio_channel
from baton.settings import FIRST_TOKEN_SOURCES
from baton.tracing import SequenceTiming, request_id_metadata
from baton.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from router.backend import BackendError, BackendErrorKind, GenerateRequest, ModelInfo, Route, TokenEvent
from router.link_warmer import LinkWarmer
from router.placement.base import PlacementStore, WorkerRecord
from router.policy import Pairing, PairingPolicy, eligible, place
from router.wire import event_from_chunk, sampling_to_proto, token_logprobs

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClusterConfig:
    model_fingerprint: str  # engine.config.model_fingerprint() of the served model
    block_size: int
    max_model_len: int
    vocab_size: int | None = None
    reserve_timeout_s: float = 10.0
    prefill_timeout_s: float = 300.0
    decode_timeout_s: float = 1800.0  # the whole token stream
    control_timeout_s: float = 2.0  # Abort
    refresh_interval_s: float = 1.0  # readiness snapshot from the store
    max_attempts: int = 3
    overload_wait_s: float = 60.0  # how long a sequence may wait for a full cluster to have room
    secret: str = field(default="", repr=False)  # shared secret the workers authenticate us with
    first_token_from: str = "prefill"  # "prefill" | "decode": who streams a split request's first token

    def __post_init__(self) -> None:
        if self.first_token_from not in FIRST_TOKEN_SOURCES:
            raise ValueError(f"first_token_from must be one of {FIRST_TOKEN_SOURCES}, got {self.first_token_from!r}")


_KIND_BY_ERROR = {
    common_pb2.ERROR_CODE_INVALID_ARGUMENT: BackendErrorKind.INVALID_ARGUMENT,
    common_pb2.ERROR_CODE_RESOURCE_EXHAUSTED: BackendErrorKind.OVERLOADED,
    common_pb2.ERROR_CODE_DEADLINE_EXCEEDED: BackendErrorKind.TIMEOUT,
    common_pb2.ERROR_CODE_UNAVAILABLE: BackendErrorKind.UNAVAILABLE,
    common_pb2.ERROR_CODE_ABORTED: BackendErrorKind.UNAVAILABLE,
    common_pb2.ERROR_CODE_TRANSFER_FAILED: BackendErrorKind.UNAVAILABLE,
}
_RETRYABLE_ERRORS = {
    common_pb2.ERROR_CODE_RESOURCE_EXHAUSTED,
    common_pb2.ERROR_CODE_UNAVAILABLE,
    common_pb2.ERROR_CODE_TRANSFER_FAILED,
}
_KIND_BY_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: BackendErrorKind.INVALID_ARGUMENT,
    grpc.StatusCode.RESOURCE_EXHAUSTED: BackendErrorKind.OVERLOADED,
    grpc.StatusCode.DEADLINE_EXCEEDED: BackendErrorKind.TIMEOUT,
    grpc.StatusCode.UNAVAILABLE: BackendErrorKind.UNAVAILABLE,
}
_RETRYABLE_STATUS = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED}
OVERLOAD_BACKOFF_S = (0.05, 1.0)  # first and longest wait while every worker is full


class WorkerFailure(BackendError):
    """A failure attributed to one worker; ``retryable`` means another worker may succeed."""

    def __init__(self, kind: BackendErrorKind, message: str, worker_id: str, retryable: bool) -> None:
        super().__init__(kind, message)
        self.worker_id = worker_id
        self.retryable = retryable


def _from_error(err: common_pb2.Error, worker_id: str, step: str) -> WorkerFailure:
    kind = _KIND_BY_ERROR.get(err.code, BackendErrorKind.INTERNAL)
    retryable = err.retryable or err.code in _RETRYABLE_ERRORS
    name = common_pb2.ErrorCode.Name(err.code) if err.code in common_pb2.ErrorCode.values() else str(err.code)
    return WorkerFailure(
        kind, f"{step} on worker {worker_id} failed ({name}): {err.message}", worker_id, retryable
    )


def _from_rpc(err: grpc.aio.AioRpcError, worker_id: str, step: str) -> WorkerFailure:
    code = err.code()
    kind = _KIND_BY_STATUS.get(code, BackendErrorKind.INTERNAL)
    message = f"{step} on worker {worker_id} failed ({code.name}): {err.details()}"
    return WorkerFailure(kind, message, worker_id, code in _RETRYABLE_STATUS)


def _deadline_ms(timeout_s: float) -> int:
    return int((time.time() + timeout_s) * 1000)


@dataclass
class _Active:
    """Where one sequence currently lives (for abort)."""

    worker_request_id: str
    decode_address: str
    prefill_address: str | None = None
    metadata: tuple[tuple[str, str], ...] = ()  # x-request-id of the client request


@dataclass
class _Attempt:
    emitted: list[int] = field(default_factory=list)  # tokens already yielded to the router
    route_sent: bool = False


class ClusterBackend:
    def __init__(self, config: ClusterConfig, store: PlacementStore, policy: PairingPolicy) -> None:
        self.config = config
        self.store = store
        self.policy = policy
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._active: dict[str, _Active] = {}
        self._ready = False
        self._refresher: asyncio.Task[None] | None = None
        self._links = LinkWarmer(self._channel)

    # -- lifecycle and readiness --------------------------------------------------------------

    @property
    def model_info(self) -> ModelInfo:
        c = self.config
        return ModelInfo(
            max_model_len=c.max_model_len, vocab_size=c.vocab_size, model_fingerprint=c.model_fingerprint
        )

    def ready(self) -> bool:
        return self._ready

    async def refresh(self) -> bool:
        """Re-read the registry: ready iff a decode worker of our model is live. New prefill-decode
        pairs are asked to open their KV link now (router/link_warmer.py)."""
        try:
            prefill, decode = eligible(await self.store.live_workers(), self.config.model_fingerprint)
            self._ready = bool(decode)
        except Exception:
            log.exception("placement store unreachable; reporting not ready")
            self._ready = False
            return False
        self._links.update(prefill, decode)
        return self._ready

    async def start(self) -> None:
        await self.refresh()

        async def loop() -> None:
            while True:
                await asyncio.sleep(self.config.refresh_interval_s)
                await self.refresh()

        self._refresher = asyncio.create_task(loop())

    async def close(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
            await asyncio.gather(self._refresher, return_exceptions=True)
        await self._links.close()
        channels, self._channels = list(self._channels.values()), {}
        await asyncio.gather(*(ch.close() for ch in channels), return_exceptions=True)

    def _channel(self, address: str) -> grpc.aio.Channel:
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = aio_channel(address, self.config.secret)
        return channel

    # -- generation ---------------------------------------------------------------------------

    async def generate(self, request: GenerateRequest) -> AsyncIterator[TokenEvent]:
        cfg = self.config
        state = _Attempt()
        excluded: set[str] = set()  # failed workers: not asked again for this sequence
        full: set[str] = set()  # full workers: skipped until every worker is full, then waited for
        last_full: WorkerFailure | None = None
        wait_until = time.monotonic() + cfg.overload_wait_s
        backoff = OVERLOAD_BACKOFF_S[0]
        attempt = tries = 0  # failures counted against max_attempts; placements (names the worker request)
        finished = False
        try:
            while True:
                try:
                    pairing = await self._place(request, excluded | full)
                except BackendError as err:
                    if not full or err.kind != BackendErrorKind.UNAVAILABLE:
                        raise
                    if time.monotonic() >= wait_until:
                        raise last_full from None  # the cluster stayed full for overload_wait_s
                    # Every worker left is full: give them time to drain, then try them all again.
                    await asyncio.sleep(min(backoff, max(0.0, wait_until - time.monotonic())))
                    backoff = min(2 * backoff, OVERLOAD_BACKOFF_S[1])
                    full.clear()
                    continue
                placed = time.monotonic()
                try:
                    async for event in self._run(request, pairing, state, tries, placed):
                        state.emitted.extend(event.token_ids)
                        yield event
                        if event.finish_reason is not None:
                            finished = True
                            return
                    raise WorkerFailure(
                        BackendErrorKind.INTERNAL,
                        f"decode worker {pairing.decode.worker_id} ended the stream without a finish reason",
                        pairing.decode.worker_id,
                        retryable=True,
                    )
                except WorkerFailure as failure:
                    await self._abort_active(request.request_id)
                    tries += 1
                    if failure.kind == BackendErrorKind.OVERLOADED:
                        full.add(failure.worker_id)  # healthy, only full: not an attempt
                        last_full = failure
                        continue
                    attempt += 1
                    if not failure.retryable or attempt == cfg.max_attempts:
                        raise
                    log.warning(
                        "retrying %s without %s: %s", request.request_id, failure.worker_id, failure.message
                    )
                    excluded.add(failure.worker_id)
        finally:
            if not finished:
                await asyncio.shield(self._abort_active(request.request_id))
            self._active.pop(request.request_id, None)

    async def _place(self, request: GenerateRequest, excluded: set[str]) -> Pairing:
        cfg = self.config
        try:
            return await place(
                self.store,
                self.policy,
                cfg.model_fingerprint,
                cfg.block_size,
                request.prompt_token_ids,
                excluded,
            )
        except BackendError:
            raise
        except Exception as err:  # the store is unreachable or broken: no placement, no request
            log.exception("placement failed")
            raise BackendError(BackendErrorKind.UNAVAILABLE, f"placement store error: {err}") from err

    async def _run(
        self, request: GenerateRequest, pairing: Pairing, state: _Attempt, tries: int, placed: float
    ) -> AsyncIterator[TokenEvent]:
        """One placement of the sequence; ``tries``: placements before this one (0 for the first)."""
        cfg = self.config
        d = pairing.decode
        # Resuming after streamed tokens: the new D prefills prompt + those tokens itself.
        prefill = pairing.prefill if not state.emitted else None
        worker_request_id = request.request_id if tries == 0 else f"{request.request_id}#{tries}"
        metadata = request_id_metadata(request.trace_id or request.request_id)
        active = _Active(worker_request_id, d.address, metadata=metadata)
        self._active[request.request_id] = active
        sampling = sampling_to_proto(request.sampling)
        decode_stub = worker_pb2_grpc.DecodeServiceStub(self._channel(d.address))
        # Split: P starts computing now and D's Reserve runs beside it; D's target follows to P.
        prefill_call = None
        if prefill is not None:
            active.prefill_address = prefill.address
            prefill_call = self._start_prefill(request, prefill, worker_request_id, sampling, metadata)
        reserve_req = worker_pb2.ReserveRequest(
            request_id=worker_request_id,
            prompt_token_ids=request.prompt_token_ids,
            sampling=sampling,
            deadline_ms=_deadline_ms(cfg.reserve_timeout_s + cfg.prefill_timeout_s),
            output_token_ids=state.emitted,
        )
        try:
            try:
                reserved = await decode_stub.Reserve(
                    reserve_req, timeout=cfg.reserve_timeout_s, metadata=metadata
                )
            except grpc.aio.AioRpcError as err:
                raise _from_rpc(err, d.worker_id, "Reserve") from None
            if reserved.WhichOneof("outcome") != "handle":
                raise _from_error(reserved.error, d.worker_id, "Reserve")
        except BaseException:
            if prefill_call is not None:
                prefill_call.cancel()  # P drops the request when its caller leaves
            raise
        route = Route(d.worker_id, prefill.worker_id if prefill else None)
        timing = SequenceTiming(placed=placed, reserved=time.monotonic(), attempts=tries + 1)

        decode_req = worker_pb2.DecodeRequest(
            request_id=worker_request_id,
            local_prefill=prefill is None,
            deadline_ms=_deadline_ms(cfg.decode_timeout_s),
        )
        call = None
        held: TokenEvent | None = None  # P's first token, until D's stream starts (first_token_from=decode)
        if prefill is not None:
            answers = self._prefill_answers(prefill_call, prefill)
            target_given = asyncio.ensure_future(
                self._give_target(prefill, worker_request_id, reserved.handle, metadata)
            )
            try:
                first = await anext(answers)  # the first token; its KV may still be in flight
                await target_given
                timing.prefill_ms = first.prefill_ms
                decode_req.first_token_id = first.first_token_id
                if first.HasField("first_token_logprob"):
                    decode_req.first_token_logprob.CopyFrom(first.first_token_logprob)
                if first.HasField("first_token_top_logprobs"):
                    decode_req.first_token_top_logprobs.CopyFrom(first.first_token_top_logprobs)
                held = TokenEvent(
                    token_ids=(first.first_token_id,),
                    logprobs=_first_logprobs(first),
                    num_cached_tokens=first.num_cached_tokens,
                    route=route,
                    timing=timing,
                )
                if cfg.first_token_from == "prefill":
                    state.route_sent = True
                    yield held
                    held = None
                # D waits for the KV itself and starts decoding the moment it lands, so ask it now:
                # its second token then does not wait for P's acknowledgement and this round trip.
                call = decode_stub.Decode(decode_req, timeout=cfg.decode_timeout_s, metadata=metadata)
                # A failure from here on is retried like any other: a token already yielded is kept
                # and the next placement resumes from prompt + it (see generate()); a held one is not
                # the client's yet, so the next placement starts over.
                delivered = await anext(answers)  # every KV block landed on D
            except BaseException:
                if call is not None:
                    call.cancel()  # D drops the request (and its reservation) when its caller leaves
                raise
            finally:
                target_given.cancel()  # no-op once done
                target_given.add_done_callback(_retrieved)  # its failure was raised above, or is moot
                await answers.aclose()
            timing.prefill_done, timing.transfer_ms = time.monotonic(), delivered.transfer_ms
            active.prefill_address = None  # P is done with it

        if call is None:
            call = decode_stub.Decode(decode_req, timeout=cfg.decode_timeout_s, metadata=metadata)
        try:
            async for response in call:
                if response.WhichOneof("payload") != "chunk":
                    raise _from_error(response.error, d.worker_id, "Decode")
                try:
                    event = event_from_chunk(response.chunk, response.chunk.num_cached_tokens)
                except ValueError as err:
                    raise WorkerFailure(
                        BackendErrorKind.INTERNAL,
                        f"malformed chunk from {d.worker_id}: {err}",
                        d.worker_id,
                        False,
                    ) from None
                if held is not None:  # D's first chunk: the request joined its batch
                    event, held = _after(held, event), None
                    state.route_sent = True
                elif not state.route_sent:
                    state.route_sent = True
                    event = replace(event, route=route, timing=timing)
                yield event
                if event.finish_reason is not None:
                    return
        except grpc.aio.AioRpcError as err:
            raise _from_rpc(err, d.worker_id, "Decode") from None
        finally:
            call.cancel()

    def _start_prefill(
        self,
        request: GenerateRequest,
        prefill: WorkerRecord,
        worker_request_id: str,
        sampling: common_pb2.SamplingParams,
        metadata: tuple[tuple[str, str], ...],
    ) -> grpc.aio.UnaryStreamCall:
        """Start P's PrefillStream with the KV target to follow (``_give_target``): P computes the prompt
        while D reserves its blocks, and holds the KV until the target comes."""
        stub = worker_pb2_grpc.PrefillServiceStub(self._channel(prefill.address))
        req = worker_pb2.PrefillRequest(
            request_id=worker_request_id,
            prompt_token_ids=request.prompt_token_ids,
            sampling=sampling,
            deadline_ms=_deadline_ms(self.config.prefill_timeout_s),
            kv_target_follows=True,
        )
        return stub.PrefillStream(req, timeout=self.config.prefill_timeout_s, metadata=metadata)

    async def _give_target(
        self,
        prefill: WorkerRecord,
        worker_request_id: str,
        target: worker_pb2.KVTarget,
        metadata: tuple[tuple[str, str], ...],
    ) -> None:
        """D's reserved blocks to the PrefillStream running on P; a refusal raises ``WorkerFailure``."""
        stub = worker_pb2_grpc.PrefillServiceStub(self._channel(prefill.address))
        req = worker_pb2.SetKVTargetRequest(request_id=worker_request_id, kv_target=target)
        try:
            given = await stub.SetKVTarget(req, timeout=self.config.reserve_timeout_s, metadata=metadata)
        except grpc.aio.AioRpcError as err:
            raise _from_rpc(err, prefill.worker_id, "SetKVTarget") from None
        if given.WhichOneof("outcome") != "accepted":
            raise _from_error(given.error, prefill.worker_id, "SetKVTarget")

    async def _prefill_answers(
        self, call: grpc.aio.UnaryStreamCall, prefill: WorkerRecord
    ) -> AsyncIterator[worker_pb2.PrefillResult]:
        """P's two answers: the first token (KV pending), then KV delivered; a failure raises instead."""
        try:
            for pending in (True, False):
                response = await _next_answer(call, prefill.worker_id)
                if not pending or response.WhichOneof("outcome") != "result":
                    # P ends the call right after its last answer (or an error): read that end, so
                    # the call completes rather than being cancelled with operations pending.
                    with contextlib.suppress(grpc.aio.AioRpcError):
                        await call.read()
                yield _checked_result(response, pending, prefill.worker_id, self.config.vocab_size)
        finally:
            if not call.done():
                call.cancel()

    # -- abort --------------------------------------------------------------------------------

    async def abort(self, request_id: str) -> None:
        await self._abort_active(request_id)

    async def _abort_active(self, request_id: str) -> None:
        active = self._active.pop(request_id, None)
        if active is None:
            return
        calls = [(worker_pb2_grpc.DecodeServiceStub, active.decode_address)]
        if active.prefill_address is not None:
            calls.append((worker_pb2_grpc.PrefillServiceStub, active.prefill_address))
        req = worker_pb2.AbortRequest(request_id=active.worker_request_id, reason="cancelled by the router")
        for stub_cls, address in calls:
            try:
                await stub_cls(self._channel(address)).Abort(
                    req, timeout=self.config.control_timeout_s, metadata=active.metadata
                )
            except grpc.aio.AioRpcError as err:
                log.warning("Abort of %s on %s failed: %s", request_id, address, err.code().name)


def _retrieved(task: asyncio.Future) -> None:
    """Mark a side task's outcome as seen (no "exception was never retrieved" at collection)."""
    if not task.cancelled():
        task.exception()


async def _next_answer(call, worker_id: str) -> worker_pb2.PrefillResponse:
    try:
        response = await call.read()
    except grpc.aio.AioRpcError as err:
        raise _from_rpc(err, worker_id, "Prefill") from None
    if response is grpc.aio.EOF:
        raise WorkerFailure(
            BackendErrorKind.UNAVAILABLE, f"prefill worker {worker_id} ended its answer early", worker_id, True
        )
    return response


def _checked_result(
    response: worker_pb2.PrefillResponse, pending: bool, worker_id: str, vocab: int | None
) -> worker_pb2.PrefillResult:
    """The result in one of P's answers (``pending``: the first), or the failure it stands for."""
    if response.WhichOneof("outcome") != "result":
        raise _from_error(response.error, worker_id, "Prefill")
    result = response.result
    problem = None
    if result.kv_pending != pending:
        problem = f"answered out of order (kv_pending={result.kv_pending})"
    elif result.first_token_id < 0 or (vocab is not None and result.first_token_id >= vocab):
        problem = f"returned token id {result.first_token_id}"
    if problem is not None:
        raise WorkerFailure(BackendErrorKind.INTERNAL, f"prefill worker {worker_id} {problem}", worker_id, False)
    return result


def _after(first: TokenEvent, event: TokenEvent) -> TokenEvent:
    """``event`` (D's first chunk) led by the held ``first`` token, which keeps the first event's fields."""
    return replace(
        event,
        token_ids=first.token_ids + event.token_ids,
        logprobs=first.logprobs + event.logprobs,
        num_cached_tokens=first.num_cached_tokens,
        route=first.route,
        timing=first.timing,
    )


def _first_logprobs(result: worker_pb2.PrefillResult):
    if not result.HasField("first_token_logprob"):
        return ()
    top = [result.first_token_top_logprobs] if result.HasField("first_token_top_logprobs") else []
    return token_logprobs([result.first_token_logprob], top, 1)
