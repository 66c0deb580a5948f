"""The decode graphs' input packing (host side, no GPU needed): the element-by-element path for small
buckets writes exactly what the vectorised path writes."""

from __future__ import annotations

import random

import numpy as np
import pytest

from engine.cuda_graphs import SMALL_PACK_ROWS, graph_batch_sizes, pack_decode_inputs

WIDTH, BLOCK = 12, 16


def _packed(b: int, n: int, small_rows: int, seed: int) -> np.ndarray:
    rng = random.Random(seed)
    positions = [rng.randrange(0, WIDTH * BLOCK) for _ in range(n)]
    blocks = [rng.sample(range(1000), p // BLOCK + 1 + rng.randrange(0, 2)) for p in positions]
    tokens = [rng.randrange(0, 50_000) for _ in range(n)]
    host = np.full(5 * b + 1 + b * WIDTH, 7777, dtype=np.int32)  # stale values from an earlier step
    pack_decode_inputs(host, b, WIDTH, BLOCK, tokens, positions, blocks, small_rows=small_rows)
    if n:
        p, i = positions[0], 0
        assert host[2 * b + i] == blocks[0][p // BLOCK] * BLOCK + p % BLOCK  # the new token's KV slot
    return host


@pytest.mark.parametrize("b", [s for s in graph_batch_sizes(64) if s <= SMALL_PACK_ROWS])
def test_small_bucket_packing_matches_the_vectorised_path(b: int) -> None:
    for n in range(1, b + 1):
        for seed in range(5):
            assert np.array_equal(_packed(b, n, SMALL_PACK_ROWS, seed), _packed(b, n, 0, seed))


def test_padding_rows_touch_no_slot() -> None:
    host = _packed(4, 1, SMALL_PACK_ROWS, 0)
    assert list(host[2 * 4 + 1 : 3 * 4]) == [-1, -1, -1]  # slots of rows 1..3
    assert list(host[3 * 4 + 1 : 4 * 4]) == [0, 0, 0]  # their seq_lens
    assert list(host[4 * 4 : 5 * 4 + 1]) == [0, 1, 1, 1, 1]  # query_start_loc


def test_eager_step_inputs_are_aligned_for_triton_whatever_the_batch() -> None:
    # Triton compiles a kernel variant per pointer alignment and per stride % 16: unaligned views
    # would make new batch shapes compile mid-serving. Every view starts on 16 bytes, tables are
    # 16 wide or more.
    from engine.sampling.params import SamplingParams
    from tests.engine.helpers import make_engine, random_prompts
    from tests.engine.oracle import TINY_LLAMA, hf_model, hf_weights

    eng = make_engine(TINY_LLAMA, hf_weights(hf_model(TINY_LLAMA)), block_size=4, max_batched=23, chunk=7)
    seen = []
    prepare = eng.runner.prepare
    eng.runner.prepare = lambda batch: seen.append(prepare(batch)) or seen[-1]
    for rid, p in random_prompts(9, TINY_LLAMA["vocab_size"], 1, 40, seed=3).items():
        eng.add_request(rid, p, SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True))
    while eng.has_unfinished():
        eng.step()
    assert len({(len(x.input_ids), x.meta.block_tables.shape) for x in seen}) > 5  # many shapes
    for x in seen:
        m = x.meta
        for view in (x.input_ids, x.positions, x.logits_rows, m.slot_mapping, m.seq_lens, m.query_start_loc, m.block_tables):
            assert (view.data_ptr() - view.untyped_storage().data_ptr()) % 16 == 0
        assert m.block_tables.stride(0) % 16 == 0 and m.block_tables.shape[1] % 16 == 0
