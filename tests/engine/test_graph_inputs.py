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
