"""One contract, two placement stores: the embedded one and Redis (a real redis-server)."""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from collections.abc import AsyncIterator

import pytest

from router.hashing import block_hashes
from router.placement import EmbeddedPlacementStore, KVEventBatch, PlacementStore, WorkerRecord, WorkerRole
from router.placement.redis_store import RedisPlacementStore

pytestmark = pytest.mark.anyio

FP = "fp-model-a"


@pytest.fixture(params=["embedded", "redis"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[PlacementStore]:
    if request.param == "embedded":
        s: PlacementStore = EmbeddedPlacementStore()
    else:
        url = request.getfixturevalue("redis_url")
        s = RedisPlacementStore.from_url(url, prefix="{test-" + uuid.uuid4().hex + "}")
    try:
        yield s
    finally:
        await s.close()


def worker(worker_id: str, role: WorkerRole = WorkerRole.PREFILL, **kw: object) -> WorkerRecord:
    fields: dict = dict(
        address=f"127.0.0.1:{1000 + len(worker_id)}",
        model_fingerprint=FP,
        block_size=4,
        num_total_blocks=100,
        num_free_blocks=80,
    )
    fields.update(kw)
    return WorkerRecord(worker_id=worker_id, role=role, **fields)


def h(i: int) -> bytes:
    return hashlib.sha256(str(i).encode()).digest()


def stored(worker_id: str, seq: int, hashes: list[bytes], **kw: object) -> KVEventBatch:
    return KVEventBatch(worker_id=worker_id, sequence=seq, stored_block_hashes=tuple(hashes), **kw)


async def test_register_and_list_roundtrip(store: PlacementStore) -> None:
    assert await store.live_workers() == []
    p = worker(
        "p0", num_running=2, num_waiting=3, model_name="m", max_model_len=2048, kv_transfer_address="x:1"
    )
    d = worker("d0", WorkerRole.DECODE)
    await store.register(d, ttl_s=10)
    await store.register(p, ttl_s=10)
    assert await store.live_workers() == [d, p]  # sorted by id, every field round-trips


async def test_heartbeat_updates_load_and_reports_liveness(store: PlacementStore) -> None:
    assert await store.heartbeat(worker("p0"), ttl_s=10) is False  # unknown: registered now
    assert await store.heartbeat(worker("p0", num_free_blocks=7, num_running=5), ttl_s=10) is True
    [rec] = await store.live_workers()
    assert (rec.num_free_blocks, rec.num_running) == (7, 5)


async def test_ttl_expiry_drops_worker_and_index(store: PlacementStore) -> None:
    await store.register(worker("p0"), ttl_s=0.3)
    await store.register(worker("p1"), ttl_s=30)
    assert await store.apply_kv_event(stored("p0", 1, [h(1), h(2)]))
    await asyncio.sleep(0.15)
    assert await store.heartbeat(worker("p0"), ttl_s=0.3) is True  # refreshed in time
    await asyncio.sleep(0.2)
    assert [w.worker_id for w in await store.live_workers()] == ["p0", "p1"]
    await asyncio.sleep(0.3)
    assert [w.worker_id for w in await store.live_workers()] == ["p1"]
    assert await store.longest_prefix([h(1), h(2)], ["p0"]) == {"p0": 0}
    assert await store.apply_kv_event(stored("p0", 2, [h(3)])) is False  # expired workers take no events
    assert await store.heartbeat(worker("p0"), ttl_s=10) is False  # back, but its index is gone
    assert await store.longest_prefix([h(1)], ["p0"]) == {"p0": 0}


async def test_deregister(store: PlacementStore) -> None:
    await store.register(worker("p0"), ttl_s=10)
    await store.apply_kv_event(stored("p0", 0, [h(1)]))
    await store.deregister("p0")
    assert await store.live_workers() == []
    assert await store.longest_prefix([h(1)], ["p0"]) == {"p0": 0}


async def test_longest_prefix_stops_at_first_miss(store: PlacementStore) -> None:
    await store.register(worker("p0"), ttl_s=10)
    await store.register(worker("p1"), ttl_s=10)
    await store.register(worker("p2"), ttl_s=10)
    await store.apply_kv_event(stored("p0", 0, [h(1), h(2), h(3)]))
    await store.apply_kv_event(stored("p1", 0, [h(1), h(3), h(4)]))  # hole at h(2)
    chain = [h(1), h(2), h(3), h(4)]
    got = await store.longest_prefix(chain, ["p0", "p1", "p2", "ghost"])
    assert got == {"p0": 3, "p1": 1, "p2": 0, "ghost": 0}
    assert await store.longest_prefix([], ["p0"]) == {"p0": 0}
    assert await store.longest_prefix(chain, []) == {}


async def test_removal_and_clear_events(store: PlacementStore) -> None:
    await store.register(worker("p0"), ttl_s=10)
    await store.apply_kv_event(stored("p0", 0, [h(1), h(2), h(3)]))
    ev = KVEventBatch("p0", 1, stored_block_hashes=(h(9),), removed_block_hashes=(h(3), h(9)))
    assert await store.apply_kv_event(ev)  # removals first, then stores: h(9) ends up cached
    assert await store.longest_prefix([h(1), h(2), h(3)], ["p0"]) == {"p0": 2}
    assert await store.longest_prefix([h(9)], ["p0"]) == {"p0": 1}
    assert await store.apply_kv_event(
        KVEventBatch("p0", 2, all_blocks_cleared=True, stored_block_hashes=(h(5),))
    )
    assert await store.longest_prefix([h(1)], ["p0"]) == {"p0": 0}
    assert await store.longest_prefix([h(5)], ["p0"]) == {"p0": 1}


async def test_sequence_duplicates_ignored_and_gaps_reset(store: PlacementStore) -> None:
    await store.register(worker("p0"), ttl_s=10)
    assert await store.apply_kv_event(stored("p0", 5, [h(1)]))
    assert await store.apply_kv_event(KVEventBatch("p0", 5, removed_block_hashes=(h(1),))) is False
    assert await store.apply_kv_event(KVEventBatch("p0", 4, removed_block_hashes=(h(1),))) is False
    assert await store.longest_prefix([h(1)], ["p0"]) == {"p0": 1}
    assert await store.apply_kv_event(stored("p0", 6, [h(2)]))
    assert await store.longest_prefix([h(1), h(2)], ["p0"]) == {"p0": 2}
    # 7 was lost: the index may hold blocks the worker evicted, so it is cleared.
    assert await store.apply_kv_event(stored("p0", 8, [h(3)]))
    assert await store.longest_prefix([h(1)], ["p0"]) == {"p0": 0}
    assert await store.longest_prefix([h(3)], ["p0"]) == {"p0": 1}


async def test_register_is_a_fresh_start(store: PlacementStore) -> None:
    await store.register(worker("p0"), ttl_s=10)
    await store.apply_kv_event(stored("p0", 3, [h(1)]))
    await store.register(worker("p0"), ttl_s=10)  # restarted worker: empty cache, sequence restarts
    assert await store.longest_prefix([h(1)], ["p0"]) == {"p0": 0}
    assert await store.apply_kv_event(stored("p0", 0, [h(2)]))
    assert await store.longest_prefix([h(2)], ["p0"]) == {"p0": 1}


async def test_fingerprint_mismatch_and_unknown_worker_ignored(store: PlacementStore) -> None:
    await store.register(worker("p0"), ttl_s=10)
    assert await store.apply_kv_event(stored("p0", 0, [h(1)], model_fingerprint="other")) is False
    assert await store.apply_kv_event(stored("nobody", 0, [h(1)])) is False
    assert await store.apply_kv_event(stored("p0", 0, [h(1)], model_fingerprint=FP))
    assert await store.longest_prefix([h(1)], ["p0", "nobody"]) == {"p0": 1, "nobody": 0}


async def test_long_chains_and_large_events(store: PlacementStore) -> None:
    tokens = list(range(40_000))
    chain = block_hashes(FP, tokens, 4)  # 10,000 blocks: exercises batching limits
    await store.register(worker("p0"), ttl_s=10)
    assert await store.apply_kv_event(stored("p0", 0, chain[:9_000]))
    assert await store.longest_prefix(chain, ["p0"]) == {"p0": 9_000}
    assert await store.apply_kv_event(KVEventBatch("p0", 1, removed_block_hashes=tuple(chain[4_000:])))
    assert await store.longest_prefix(chain, ["p0"]) == {"p0": 4_000}


async def test_concurrent_updates_are_consistent(store: PlacementStore) -> None:
    ids = [f"w{i}" for i in range(8)]
    await asyncio.gather(*(store.register(worker(w), ttl_s=10) for w in ids))
    await asyncio.gather(
        *(store.apply_kv_event(stored(w, seq, [h(seq)])) for w in ids for seq in range(1)),
        *(store.heartbeat(worker(w, num_running=3), ttl_s=10) for w in ids),
    )
    assert [w.worker_id for w in await store.live_workers()] == ids
    assert await store.longest_prefix([h(0)], ids) == dict.fromkeys(ids, 1)


def test_records_and_events_validate() -> None:
    with pytest.raises(ValueError):
        worker("has space")
    with pytest.raises(ValueError):
        worker("p0", num_free_blocks=-1)
    with pytest.raises(ValueError):
        KVEventBatch("p0", 0, stored_block_hashes=(b"short",))
    with pytest.raises(ValueError):
        KVEventBatch("p0", -1)
