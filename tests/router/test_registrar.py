"""WorkerRegistrar: worker info and KV events (protobuf) into the placement store, pushed or polled."""

from __future__ import annotations

import pytest

from baton.v1 import common_pb2
from router.hashing import block_hashes
from router.placement import EmbeddedPlacementStore, WorkerRole
from router.registrar import WorkerRegistrar
from tests.router.fake_workers import FakeDecode, FakePrefill, WorkerServer, info

pytestmark = pytest.mark.anyio


async def test_poll_registers_answering_workers() -> None:
    store = EmbeddedPlacementStore()
    registrar = WorkerRegistrar(store, ttl_s=5, poll_interval_s=1)
    async with WorkerServer(FakeDecode("d0")) as d, WorkerServer(FakePrefill("p0")) as p:
        targets = [
            (d.address, WorkerRole.DECODE),
            (p.address, WorkerRole.PREFILL),
            ("127.0.0.1:1", WorkerRole.DECODE),
        ]
        assert await registrar.poll_once(targets) == 2
        workers = {w.worker_id: w for w in await store.live_workers()}
        assert set(workers) == {"d0", "p0"}
        assert workers["d0"].role == WorkerRole.DECODE and workers["d0"].address == d.address
        assert workers["p0"].num_free_blocks == 900
        # A worker answering on the wrong service / address is not trusted.
        assert await registrar.poll_once([(d.address, WorkerRole.PREFILL)]) == 0


async def test_push_info_and_kv_events() -> None:
    store = EmbeddedPlacementStore()
    registrar = WorkerRegistrar(store, ttl_s=5, poll_interval_s=1)
    await registrar.register(info("p0", common_pb2.WORKER_ROLE_PREFILL, "127.0.0.1:5"))
    assert await registrar.publish_info(
        info("p0", common_pb2.WORKER_ROLE_PREFILL, "127.0.0.1:5", num_waiting=2)
    )
    chain = block_hashes("fp", list(range(12)), 4)
    event = common_pb2.KVEvent(worker_id="p0", stored_block_hashes=chain, sequence=1, model_fingerprint="fp")
    assert await registrar.publish_kv_event(event)
    assert await store.longest_prefix(chain, ["p0"]) == {"p0": 3}
    with pytest.raises(ValueError):
        await registrar.publish_kv_event(
            common_pb2.KVEvent(worker_id="p0", stored_block_hashes=[b"short"], sequence=2)
        )
    with pytest.raises(ValueError):
        await registrar.publish_info(info("p1", common_pb2.WORKER_ROLE_UNSPECIFIED, "x:1"))


def test_poll_interval_must_beat_ttl() -> None:
    with pytest.raises(ValueError):
        WorkerRegistrar(EmbeddedPlacementStore(), ttl_s=1, poll_interval_s=2)
