"""Feeds the placement store from the workers: their ``WorkerInfo`` (load, free blocks, liveness) and
their ``KVEvent``s (prefix-cache changes).

Two ways in, for two deployments:
- push: whoever receives a worker's info/events (the launcher in the one-command mode, a worker-side
  publisher in a cluster) calls ``publish_info`` / ``publish_kv_event``;
- pull: ``poll`` calls ``GetInfo`` on a fixed list of worker addresses every ``poll_interval_s`` and
  heartbeats what answers; a worker that stops answering expires after ``ttl_s``.
Received messages are validated (``router.wire``) before they touch the store.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

import grpc

from baton.grpc_auth import aio_channel
from baton.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from router.placement.base import PlacementStore, WorkerRole
from router.wire import event_from_proto, record_from_proto

log = logging.getLogger(__name__)


class WorkerRegistrar:
    def __init__(
        self,
        store: PlacementStore,
        ttl_s: float = 10.0,
        poll_interval_s: float = 2.0,
        timeout_s: float = 2.0,
        secret: str = "",
        on_info: Callable[[common_pb2.WorkerInfo], None] | None = None,
    ) -> None:
        if not 0 < poll_interval_s < ttl_s:
            raise ValueError("poll_interval_s must be positive and below ttl_s, or live workers would expire")
        self.store = store
        self.ttl_s = ttl_s
        self.poll_interval_s = poll_interval_s
        self.timeout_s = timeout_s
        self.secret = secret
        # Sees every validated WorkerInfo (e.g. ``RouterMetrics.workers.observe``: the cluster view).
        self.on_info = on_info
        self._event_seq: dict[str, int] = {}  # worker id -> last KV event sequence applied

    def forget(self, worker_id: str) -> None:
        """A worker restarted: its event sequence starts over."""
        self._event_seq.pop(worker_id, None)

    async def register(self, info: common_pb2.WorkerInfo) -> None:
        """A worker (re)started: fresh entry, empty prefix index."""
        await self.store.register(record_from_proto(info), self.ttl_s)

    async def publish_info(self, info: common_pb2.WorkerInfo) -> bool:
        """Heartbeat with current load; False when the worker was not live before."""
        live = await self.store.heartbeat(record_from_proto(info), self.ttl_s)
        self._observe(info)
        return live

    def _observe(self, info: common_pb2.WorkerInfo) -> None:
        if self.on_info is not None:
            try:
                self.on_info(info)
            except Exception:  # an observer's bug must not stop registration
                log.exception("WorkerInfo observer failed")

    async def publish_kv_event(self, event: common_pb2.KVEvent) -> bool:
        return await self.store.apply_kv_event(event_from_proto(event))

    async def poll_once(self, targets: Sequence[tuple[str, WorkerRole]]) -> int:
        """``GetInfo`` on every (address, role); returns how many answered."""
        results = await asyncio.gather(*(self._poll_one(address, role) for address, role in targets))
        return sum(results)

    async def poll(self, targets: Sequence[tuple[str, WorkerRole]]) -> None:
        """Forever (cancel to stop)."""
        while True:
            await self.poll_once(targets)
            await asyncio.sleep(self.poll_interval_s)

    async def _poll_one(self, address: str, role: WorkerRole) -> bool:
        channel = aio_channel(address, self.secret)
        try:
            stub_cls = (
                worker_pb2_grpc.DecodeServiceStub
                if role == WorkerRole.DECODE
                else worker_pb2_grpc.PrefillServiceStub
            )
            info = await stub_cls(channel).GetInfo(common_pb2.GetInfoRequest(), timeout=self.timeout_s)
            record = record_from_proto(info)
            if record.role != role or record.address != address:
                log.warning(
                    "worker at %s reports role %s / address %s; ignoring",
                    address,
                    record.role,
                    record.address,
                )
                return False
            if not await self.store.heartbeat(record, self.ttl_s):
                # New (or expired and back): a fresh entry with an empty prefix index.
                await self.store.register(record, self.ttl_s)
                self._event_seq.pop(record.worker_id, None)
            self._observe(info)
            await self._pull_events(stub_cls(channel), record.worker_id)
            return True
        except (grpc.aio.AioRpcError, ValueError) as err:
            log.warning("GetInfo on %s failed: %s", address, err)
            return False
        finally:
            await channel.close()

    async def _pull_events(self, stub, worker_id: str) -> None:
        """Apply the worker's prefix-cache events we have not seen (in order; the store handles gaps)."""
        after = self._event_seq.get(worker_id, 0)
        response = await stub.GetKVEvents(worker_pb2.KVEventsRequest(after_sequence=after), timeout=self.timeout_s)
        for event in response.events:
            await self.store.apply_kv_event(event_from_proto(event))
            self._event_seq[worker_id] = event.sequence
