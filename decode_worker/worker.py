"""DecodeWorker: the plain class behind the gRPC service and the Ray actor (testable without either)."""

from __future__ import annotations

import logging
import queue
import time
import uuid
from collections.abc import Callable, Iterator

from decode_worker.config import DecodeWorkerConfig
from decode_worker.scheduler import Refused, Reservation, Reservations
from engine.builder import load_worker_engine
from engine.engine import RequestOutput
from engine.host import EngineHost
from engine.metrics import KVTransferMetrics
from engine.request import FinishReason
from engine.sampling.params import SamplingParams
from engine.spec_decode import SpecConfig, build_spec_decoder
from kv_transfer.base import KVLayout, KVReceiver, TransferHandle, TransferState

log = logging.getLogger(__name__)
CHECK_S = 0.05  # while a Decode call waits for its KV: how often it checks its caller and deadline


def make_receiver(transport: str, kv_cache, secret: str, worker_id: str, host: str, port: int, loopback_hub=None) -> KVReceiver:
    if transport == "auto":
        transport = "nccl" if kv_cache.device.type == "cuda" else "gloo"
    if transport == "gloo":
        from kv_transfer.gloo import GlooKVReceiver

        return GlooKVReceiver(kv_cache, secret=secret, receiver_id=worker_id, host=host, port=port)
    if transport == "nccl":
        from kv_transfer.nccl import NcclKVReceiver

        return NcclKVReceiver(kv_cache, secret=secret, receiver_id=worker_id, host=host, port=port)
    if transport == "loopback":
        from kv_transfer.loopback import LoopbackReceiver

        return LoopbackReceiver(loopback_hub, kv_cache, secret=secret, receiver_id=worker_id)
    raise ValueError(f"unknown KV transport {transport!r}; expected auto, gloo, nccl or loopback")


class DecodeWorker:
    role = "decode"

    def __init__(self, config: DecodeWorkerConfig, loopback_hub=None) -> None:
        if not config.secret:
            raise ValueError("a shared secret is required (BATON_SECRET): peers authenticate with it")
        self.config = config
        self.worker_id = config.worker_id or f"decode-{uuid.uuid4().hex[:8]}"
        self.engine, self.source = load_worker_engine(config)
        if config.speculative:
            self.engine.set_spec(build_spec_decoder(self.engine, SpecConfig(
                method=config.speculative, draft_model=config.draft_model or config.model, draft_seed=config.seed if config.draft_seed is None else config.draft_seed,
                num_speculative_tokens=config.num_speculative_tokens, adaptive=config.adaptive_speculation,
            )))  # fmt: skip
        self.kv_cache = self.engine.runner.kv_cache
        self.layout = KVLayout.of(self.kv_cache)
        self.receiver = make_receiver(config.transport, self.kv_cache, config.secret, self.worker_id, config.host, config.kv_port, loopback_hub)
        self.reservations = Reservations(
            self.engine, self.receiver, config.max_reservations, config.reserve_headroom_blocks, post=lambda fn: self.host.loop.post(fn)
        )
        self.kv_transfer_metrics = KVTransferMetrics()  # reserve -> KV landed, per reservation
        self.host = EngineHost(self.engine, name=self.worker_id, kv_transfer=self.kv_transfer_metrics)
        self.host.after_step = self.reservations.expire
        self.draining = False
        self.host.start()

    @property
    def fingerprint(self) -> str:
        return self.engine.fingerprint

    @property
    def vocab_size(self) -> int:
        return self.engine.config.model.vocab_size

    @property
    def kv_address(self) -> str:
        return self.receiver.address

    # --- the three steps of a request --------------------------------------------------------
    def reserve(self, request_id: str, prompt_ids: list[int], sampling: SamplingParams, output_ids: list[int] = (), deadline: float | None = None) -> TransferHandle:
        if self.draining:
            raise Refused("UNAVAILABLE", "worker is draining")
        deadline = min(deadline or float("inf"), time.time() + self.config.reservation_timeout_s)
        try:
            res = self.host.loop.call(lambda: self.reservations.reserve(request_id, list(prompt_ids), sampling, list(output_ids), deadline))
        except ValueError as e:
            raise Refused("INVALID_ARGUMENT", str(e), retryable=False) from e
        return res.handle

    def decode(
        self,
        request_id: str,
        first_token: int | None = None,
        first_logprob=None,
        local_prefill: bool = False,
        deadline: float | None = None,
        is_active: Callable[[], bool] = lambda: True,
    ) -> Iterator[RequestOutput]:
        """Wait for the reserved KV (or prefill locally), then yield outputs until the request ends.

        The first output may carry no tokens (the first token from prefill already ended the request).
        Raises ``Refused`` for unknown requests or failed transfers; aborts the request if the caller
        goes away (``is_active`` False or the generator closed)."""
        if (first_token is None) != local_prefill:
            raise Refused("INVALID_ARGUMENT", "give first_token_id (KV from a prefill worker) or local_prefill, not both or neither", retryable=False)
        res: Reservation | None = self.reservations.by_id.get(request_id)
        if res is None:
            raise Refused("NOT_FOUND", f"no reservation for request {request_id!r}", retryable=False)
        q = self.host.subscribe(request_id)
        finished = False
        try:
            if not local_prefill:
                self._wait_for_kv(res, deadline, is_active)
            elif (handle := res.handle) is not None:
                # No KV will come. A sender may still be writing into the blocks the prefill will use:
                # release here, where waiting for it (and cutting it off) stalls no other stream.
                self.receiver.release(handle)
            first = self.host.loop.call(lambda: self._start(request_id, first_token, first_logprob))
            if first is not None:
                finished = first.finished
                yield first
            while not finished:
                try:
                    out = q.get(timeout=0.1)
                except queue.Empty:
                    if not is_active():
                        return
                    if deadline is not None and time.time() > deadline:
                        raise Refused("DEADLINE_EXCEEDED", "decode deadline passed") from None
                    if not self.host.loop.alive:
                        raise Refused("INTERNAL", "the engine loop stopped") from None
                    continue
                finished = out.finished
                yield out
        finally:
            self.host.unsubscribe(request_id)
            if not finished:
                self.abort(request_id, "caller went away")
            else:
                self.host.loop.post(lambda: self.reservations.by_id.pop(request_id, None))

    def _wait_for_kv(self, res: Reservation, deadline: float | None, is_active) -> None:
        handle = res.handle
        limit = min(deadline or float("inf"), res.deadline)
        while True:
            # Woken the moment the transfer ends; the timeout only bounds the checks below.
            state = self.receiver.wait(handle, max(0.0, min(CHECK_S, limit - time.time())))
            if state == TransferState.SUCCESS:
                waited = time.monotonic() - res.created
                self.kv_transfer_metrics.on_success(waited, len(handle.block_ids) * self.layout.block_bytes)
                log.debug("request %s: KV of %d blocks landed %.1f ms after reserve", res.req.request_id, len(handle.block_ids), waited * 1000)
                return
            if state == TransferState.FAILED:
                self.kv_transfer_metrics.on_failure()
                why = self.receiver.error(handle) or "transfer failed"
                raise Refused("TRANSFER_FAILED", f"KV transfer failed: {why}")
            if time.time() > limit:
                self.kv_transfer_metrics.on_failure()
                raise Refused("DEADLINE_EXCEEDED", "KV did not arrive before the reservation's deadline")
            if not is_active():
                raise Refused("ABORTED", "caller went away", retryable=False)

    def _start(self, request_id: str, first_token: int | None, first_logprob) -> RequestOutput | None:
        res = self.reservations.start(request_id, first_token, first_logprob)
        if res.handle is not None:
            self.receiver.release(res.handle)  # every block landed; the receiver forgets it
            res.handle = None
        out = self.engine.start_reserved(res.req, first_token, first_logprob)
        if out is None:  # local prefill: tokens come from the loop like any request
            return None
        return out

    def abort(self, request_id: str, reason: str = "aborted") -> bool:
        def cancel() -> bool:
            found = request_id in self.reservations.by_id or request_id in self.engine.requests
            self.reservations.end(request_id)
            self.engine.abort(request_id)
            if found:
                self.host.deliver(RequestOutput(request_id, (), (), True, FinishReason.ABORT, 0, 0))
            return found

        try:
            return self.host.loop.call(cancel)
        except RuntimeError:
            return False

    def healthy(self) -> bool:
        return self.host.loop.alive

    def close(self) -> None:
        self.draining = True
        self.host.stop()
        self.receiver.close()
