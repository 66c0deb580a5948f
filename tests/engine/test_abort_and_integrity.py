"""Aborting a request at any point frees its blocks; the block pool's invariant always holds."""

from __future__ import annotations

import pytest

from engine.kv_cache.block_pool import BlockPool
from engine.sampling.params import SamplingParams
from tests.engine.helpers import make_engine, random_prompts
from tests.engine.oracle import TINY_LLAMA, hf_model, hf_weights


@pytest.fixture(scope="module")
def weights():
    return hf_weights(hf_model(TINY_LLAMA))


@pytest.mark.parametrize("abort_after_steps", [0, 1, 2, 3, 5, 8, 13])
def test_abort_at_any_step_frees_blocks(weights, abort_after_steps):
    eng = make_engine(TINY_LLAMA, weights, block_size=4, num_blocks=64, max_batched=16, chunk=8)
    prompts = random_prompts(4, TINY_LLAMA["vocab_size"], 10, 30, seed=abort_after_steps)
    for rid, p in prompts.items():
        eng.add_request(rid, p, SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True))
    for _ in range(abort_after_steps):
        eng.step()
    eng.abort("r0")
    eng.abort("r2")
    eng.check_integrity()
    while eng.has_unfinished():
        eng.step()
        eng.check_integrity()
    # Nothing referenced at the end: every block is free or cached.
    assert eng.kv.num_free_blocks == eng.kv.pool.num_blocks


def test_block_pool_refcounts_and_lru_eviction():
    pool = BlockPool(4)
    a = pool.allocate(2)
    pool.cache_block(a[0], b"h0", None)
    pool.free(a)
    pool.check_integrity()
    assert pool.lookup(b"h0") == a[0]
    pool.touch([a[0]])  # prefix hit takes it back from the evictable set
    pool.check_integrity()
    pool.free([a[0]])
    taken = pool.allocate(4)  # must evict the cached block last
    assert sorted(taken) == [0, 1, 2, 3]
    assert pool.lookup(b"h0") is None
    events = pool.drain_events()
    assert [e.kind for e in events] == ["stored", "removed"]
    with pytest.raises(MemoryError):
        pool.allocate(1)
    pool.free(taken)
    with pytest.raises(RuntimeError, match="double free"):
        pool.free([taken[0]])
    pool.check_integrity()


def test_oversized_and_empty_prompts_are_rejected(weights):
    eng = make_engine(TINY_LLAMA, weights, block_size=4, num_blocks=8)
    with pytest.raises(ValueError, match="empty"):
        eng.add_request("e", [], SamplingParams())
    with pytest.raises(ValueError, match="KV blocks"):
        eng.add_request("big", list(range(5, 45)), SamplingParams())
    with pytest.raises(ValueError, match="context"):
        eng.add_request("ctx", [5] * 600, SamplingParams())
