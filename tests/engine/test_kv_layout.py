"""Choosing how the KV cache is stored (engine/kv_cache/storage.py) when an engine is built."""

from __future__ import annotations

import pytest

from engine.builder import build_engine
from engine.config import CacheConfig
from engine.kv_cache.storage import is_block_major
from tests.engine.oracle import TINY_LLAMA, hf_model, hf_weights


@pytest.fixture(scope="module")
def weights():
    return hf_weights(hf_model(TINY_LLAMA))


def test_auto_is_layer_major_on_cpu_and_forcing_is_checked(weights) -> None:
    engine = build_engine(TINY_LLAMA, weights, cache=CacheConfig(block_size=4, num_blocks=16))
    assert engine.runner.kv_cache.is_contiguous() and not is_block_major(engine.runner.kv_cache)
    with pytest.raises(ValueError, match="cannot read a block-major KV cache"):
        build_engine(
            TINY_LLAMA, weights, cache=CacheConfig(block_size=4, num_blocks=16, layout="block-major"),
            attention_backend="torch",
        )  # fmt: skip
    with pytest.raises(ValueError, match="CacheConfig.layout"):
        CacheConfig(layout="row-major")
