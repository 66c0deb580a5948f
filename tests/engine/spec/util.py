"""Helpers for the speculative-decoding tests."""

from __future__ import annotations

from engine.spec_decode import SpecConfig, build_spec_decoder
from tests.engine.helpers import make_engine
from tests.engine.oracle import TINY_LLAMA


def spec_engine(weights, config: SpecConfig, draft_weights=None, **engine_kw):
    """A tiny-llama engine with speculative decoding; the draft (if any) gets its own KV cache."""
    eng = make_engine(TINY_LLAMA, weights, **engine_kw)
    draft = None
    if config.method == "draft":
        draft = make_engine(
            TINY_LLAMA, draft_weights, num_blocks=engine_kw.get("num_blocks", 256), prefix=False
        )
    eng.set_spec(build_spec_decoder(eng, config, draft_engine=draft))
    return eng


def assert_all_blocks_back(eng) -> None:
    """Target and draft caches: no leak, nothing referenced once every request ended."""
    eng.check_integrity()
    pool = eng.kv.pool
    assert all(pool.ref_count(b) == 0 for b in range(pool.num_blocks)), "target blocks still referenced"
    proposer = eng.spec.proposer if eng.spec is not None else None
    if proposer is not None and getattr(proposer, "needs_draft_model", False):
        assert len(proposer) == 0, "draft shadows left behind"
        assert proposer.kv.num_free_blocks == proposer.kv.pool.num_blocks, "draft blocks leaked"
