"""PrefillWorker: the plain class behind the gRPC service and the Ray actor (testable without either)."""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import Future

from engine.builder import load_worker_engine
from engine.host import EngineHost
from engine.metrics import KVTransferMetrics
from engine.sampling.params import SamplingParams
from kv_transfer.base import KVLayout, KVSender, TransferHandle
from kv_transfer.pair import parse_address
from prefill_worker.config import PrefillWorkerConfig
from prefill_worker.scheduler import PrefillFailed, PrefillOutcome, PrefillTransfers

log = logging.getLogger(__name__)
MAX_CONNECT_ADDRESSES = 1024  # decode workers one Connect call may name
MAX_EARLY_TARGETS = 4096  # KV targets held for requests that have not arrived yet


def make_sender(transport: str, device, secret: str, worker_id: str, host: str, loopback_hub=None) -> KVSender:
    if transport == "auto":
        transport = "nccl" if str(device).startswith("cuda") else "gloo"
    if transport == "gloo":
        from kv_transfer.gloo import GlooKVSender

        return GlooKVSender(secret=secret, sender_id=worker_id, host=host)
    if transport == "nccl":
        from kv_transfer.nccl import NcclKVSender

        return NcclKVSender(device=device, secret=secret, sender_id=worker_id, host=host)
    if transport == "loopback":
        from kv_transfer.loopback import LoopbackSender

        return LoopbackSender(loopback_hub, secret=secret)
    raise ValueError(f"unknown KV transport {transport!r}; expected auto, gloo, nccl or loopback")


class PrefillWorker:
    role = "prefill"

    def __init__(self, config: PrefillWorkerConfig, loopback_hub=None) -> None:
        if not config.secret:
            raise ValueError("a shared secret is required (BATON_SECRET): peers authenticate with it")
        self.config = config
        self.worker_id = config.worker_id or f"prefill-{uuid.uuid4().hex[:8]}"
        self.engine, self.source = load_worker_engine(config)
        self.engine.hold_blocks_on_finish = True  # KV stays pinned until the decode side has it
        self.kv_cache = self.engine.runner.kv_cache
        self.layout = KVLayout.of(self.kv_cache)
        self.sender = make_sender(config.transport, self.kv_cache.device, config.secret, self.worker_id, config.host, loopback_hub)
        transfer_metrics = KVTransferMetrics()  # recorded by the transfers, reported by the host's stats
        self.transfers = PrefillTransfers(
            self.engine, self.sender, self.kv_cache, post=lambda fn: self.host.loop.post(fn), metrics=transfer_metrics
        )
        self.host = EngineHost(self.engine, name=self.worker_id, kv_transfer=transfer_metrics)
        self.host.after_step = self.transfers.after_step
        self.engine.runner.launched_hook = self.transfers.on_launched
        self.draining = False
        self._early_targets: dict[str, TransferHandle] = {}  # engine loop thread only
        self.host.start()

    @property
    def fingerprint(self) -> str:
        return self.engine.fingerprint

    @property
    def vocab_size(self) -> int:
        return self.engine.config.model.vocab_size

    def prefill(self, request_id: str, prompt_ids: list[int], sampling: SamplingParams, handle: TransferHandle | None, deadline: float | None = None) -> PrefillOutcome:
        """Run the prompt, ship its KV into ``handle``'s blocks, return the first token. Blocks until
        the decode side acknowledged every block, or raises ``PrefillFailed``. ``handle`` None: it
        follows by ``set_kv_target`` (before the deadline)."""
        *_, delivered = self.prefill_stream(request_id, prompt_ids, sampling, handle, deadline)
        return delivered

    def prefill_stream(self, request_id: str, prompt_ids: list[int], sampling: SamplingParams, handle: TransferHandle | None, deadline: float | None = None) -> Iterator[PrefillOutcome]:
        """``prefill`` answered twice: the outcome once the first token is sampled (KV still in
        flight), then once the decode side acknowledged every block. Raises ``PrefillFailed`` in place
        of either; the request is aborted if the caller stops iterating early."""
        first, delivered, deadline = self._admit(request_id, prompt_ids, sampling, handle, deadline)
        finished = False
        try:
            yield self._wait(request_id, first, deadline)
            yield self._wait(request_id, delivered, deadline)
            finished = True
        finally:
            if not finished:
                self.abort(request_id, "caller went away")

    def _admit(self, request_id, prompt_ids, sampling, handle, deadline) -> tuple[Future, Future, float]:
        if self.draining:
            raise PrefillFailed("UNAVAILABLE", "worker is draining", retryable=True)
        deadline = min(deadline or float("inf"), time.time() + self.config.default_deadline_s)
        if handle is not None:
            self._check_target(handle, len(prompt_ids))
            deadline = min(deadline, handle.deadline)
        # Only the first token is sampled here; min_tokens still masks EOS on it.
        first_only = dataclasses.replace(sampling, max_tokens=1, min_tokens=min(sampling.min_tokens, 1), stop=())

        def admit():
            target, early = handle, self._early_targets.pop(request_id, None)
            if target is None and early is not None:  # its target came first
                self._check_target(early, len(prompt_ids))
                target = early
            req = self.engine.add_request(request_id, prompt_ids, first_only)
            return self.transfers.add(req, target, deadline)

        try:
            first, delivered = self.host.loop.call(admit)
        except ValueError as e:
            raise PrefillFailed("INVALID_ARGUMENT", str(e), retryable=False) from e
        return first, delivered, deadline

    def set_kv_target(self, request_id: str, handle: TransferHandle) -> None:
        """The target of a request admitted (or about to be) without one; raises ``PrefillFailed``.

        A target that arrives before its request is held for it until the target's deadline."""

        def give():
            tokens = self.transfers.num_prompt_tokens(request_id)
            if tokens is not None:
                self._check_target(handle, tokens)
                self.transfers.set_target(request_id, handle)
                return
            now = time.time()
            for rid in [r for r, h in self._early_targets.items() if h.deadline < now]:
                del self._early_targets[rid]
            if request_id in self._early_targets:
                raise ValueError(f"request {request_id!r} already has a KV target")
            if len(self._early_targets) >= MAX_EARLY_TARGETS:
                raise PrefillFailed("RESOURCE_EXHAUSTED", f"{MAX_EARLY_TARGETS} KV targets wait for their requests", retryable=True)
            self._early_targets[request_id] = handle

        try:
            self.host.loop.call(give)
        except ValueError as e:
            raise PrefillFailed("INVALID_ARGUMENT", str(e), retryable=False) from e

    def _check_target(self, handle: TransferHandle, num_prompt_tokens: int) -> None:
        if handle.layout != self.layout:
            raise PrefillFailed("FINGERPRINT_MISMATCH", f"decode cache layout {handle.layout} != ours {self.layout}", retryable=False)
        expected = -(-num_prompt_tokens // self.layout.block_size) - handle.first_block_index
        if handle.num_tokens != num_prompt_tokens or len(handle.block_ids) != expected or handle.first_block_index < 0:
            raise PrefillFailed("INVALID_ARGUMENT", f"kv_target holds {len(handle.block_ids)} blocks for {handle.num_tokens} tokens; the prompt needs {expected}", retryable=False)

    def _wait(self, request_id: str, future: Future, deadline: float) -> PrefillOutcome:
        try:
            return future.result(timeout=max(0.0, deadline - time.time()) + 5.0)
        except TimeoutError:
            self.abort(request_id, "deadline")
            raise PrefillFailed("DEADLINE_EXCEEDED", "prefill did not finish before its deadline", retryable=True) from None

    def abort(self, request_id: str, reason: str = "aborted") -> bool:
        def cancel():
            found = self.transfers.cancel(request_id, reason)
            self.engine.abort(request_id)
            return found

        try:
            return self.host.loop.call(cancel)
        except RuntimeError:
            return False

    def connect(self, kv_transfer_addresses: Sequence[str]) -> int:
        """Open KV links to these decode workers ahead of their first transfer; how many started
        opening. Raises ValueError for a malformed address or too many at once (before opening any)."""
        addresses = list(dict.fromkeys(kv_transfer_addresses))
        if len(addresses) > MAX_CONNECT_ADDRESSES:
            raise ValueError(f"{len(addresses)} addresses at once; at most {MAX_CONNECT_ADDRESSES}")
        for address in addresses:
            parse_address(address)
        opening = [address for address in addresses if self.sender.warm_up(address)]
        if opening:
            log.info("opening KV links to %s ahead of their first transfer", ", ".join(opening))
        return len(opening)

    def healthy(self) -> bool:
        return self.host.loop.alive

    def close(self) -> None:
        self.draining = True
        self.host.stop()
        self.sender.close()
