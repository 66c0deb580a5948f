"""Opening prefill workers' KV links to decode workers before the first request needs them.

A prefill worker builds its link to a decode worker (control connection, process group, on GPUs an
NCCL communicator: up to a second) on its first transfer there, and that request waits for it. The
router knows every pair as soon as both workers register, so after each registry read it asks each
prefill worker, once per decode worker, to open the link now (``PrefillService.Connect``). The call
answers at once; a link that cannot be opened is simply opened by the first transfer, as before.

Invariant: a pair is asked about once while both stay registered; a pair that leaves the registry
(either worker gone) and comes back is asked again, and so is one whose call failed, except a worker
that does not know the call (an older one), which is not asked again.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Callable, Sequence

import grpc

from baton.v1 import worker_pb2, worker_pb2_grpc
from router.placement import WorkerRecord

log = logging.getLogger(__name__)
CONNECT_TIMEOUT_S = 5.0


class LinkWarmer:
    def __init__(self, channel_for: Callable[[str], grpc.aio.Channel]) -> None:
        self._channel_for = channel_for
        self._asked: set[tuple[str, str]] = set()  # (prefill gRPC address, decode KV address)
        self._calls: set[asyncio.Task[None]] = set()

    def update(self, prefill: Sequence[WorkerRecord], decode: Sequence[WorkerRecord]) -> None:
        """The registry's current workers of one model: ask about every pair not asked about yet."""
        live = {(p.address, d.kv_transfer_address) for p in prefill for d in decode if d.kv_transfer_address}
        new = live - self._asked
        self._asked &= live  # forget pairs that left: asked again if they come back
        self._asked |= new
        by_prefill: dict[str, list[str]] = defaultdict(list)
        for prefill_address, kv_address in sorted(new):
            by_prefill[prefill_address].append(kv_address)
        for prefill_address, kv_addresses in by_prefill.items():
            call = asyncio.create_task(self._connect(prefill_address, kv_addresses))
            self._calls.add(call)
            call.add_done_callback(self._calls.discard)

    async def _connect(self, prefill_address: str, kv_addresses: list[str]) -> None:
        stub = worker_pb2_grpc.PrefillServiceStub(self._channel_for(prefill_address))
        request = worker_pb2.ConnectRequest(kv_transfer_addresses=kv_addresses)
        try:
            await stub.Connect(request, timeout=CONNECT_TIMEOUT_S)
        except grpc.aio.AioRpcError as err:
            if err.code() != grpc.StatusCode.UNIMPLEMENTED:
                self._asked -= {(prefill_address, kv) for kv in kv_addresses}  # try again next read
            log.info("prefill worker %s did not open KV links ahead (%s): %s", prefill_address, err.code().name, err.details())

    async def close(self) -> None:
        calls = list(self._calls)
        for call in calls:
            call.cancel()
        await asyncio.gather(*calls, return_exceptions=True)
