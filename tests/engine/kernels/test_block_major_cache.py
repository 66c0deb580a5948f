"""Every kernel that touches the paged cache gives the same result on a block-major cache.

The engine stores its GPU cache block-major (engine/kv_cache/storage.py): a layer is then a strided
view whose block stride spans every layer. The kernels index through strides, so a layer seen that way
must read and write exactly the values of the same layer stored layer-major, bit for bit (the same
arithmetic, only other addresses).
"""

from __future__ import annotations

import pytest
import torch

from engine.kernels.decode_attention import decode_attention
from engine.kernels.kv_write import kv_write
from engine.kernels.prefill_attention import prefill_attention
from engine.kernels.rotary import rotary_cos_sin
from engine.kernels.rotary_kv_write import rotary_kv_write
from engine.kv_cache.storage import allocate_kv_cache, is_block_major
from tests.engine.kernels.paged_cases import query_start_loc

LAYERS, HEADS, GROUP, HEAD_DIM, BLOCK_SIZE = 3, 2, 4, 64, 16
SEQ_LENS = [BLOCK_SIZE + 1, 3 * BLOCK_SIZE, 2 * BLOCK_SIZE - 1]
LAYER = 1  # a middle layer: offsets of both neighbours are in play


def _caches(device, dtype, num_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same random values in a layer-major and a block-major cache."""
    values = torch.randn(LAYERS, 2, num_blocks, BLOCK_SIZE, HEADS, HEAD_DIM).to(dtype)
    caches = []
    for block_major in (False, True):
        cache = allocate_kv_cache(
            LAYERS, num_blocks, BLOCK_SIZE, HEADS, HEAD_DIM, dtype=dtype, device=device, block_major=block_major
        )
        cache.copy_(values)
        caches.append(cache)
    assert is_block_major(caches[1]) and not caches[1][LAYER].is_contiguous()
    return caches[0], caches[1]


def _table(device, num_blocks: int) -> torch.Tensor:
    blocks = [-(-n // BLOCK_SIZE) for n in SEQ_LENS]
    perm = torch.randperm(num_blocks)
    table = torch.zeros(len(SEQ_LENS), max(blocks), dtype=torch.int32)
    used = 0
    for row, n in enumerate(blocks):
        table[row, :n] = perm[used : used + n].int()
        used += n
    return table.to(device)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_attention_reads_a_block_major_layer_like_a_layer_major_one(device, dtype) -> None:
    num_blocks = 12
    layer_major, block_major = _caches(device, dtype, num_blocks)
    table = _table(device, num_blocks)
    lens = torch.tensor(SEQ_LENS, dtype=torch.int32, device=device)
    scale = HEAD_DIM**-0.5
    q = torch.randn(len(SEQ_LENS), HEADS * GROUP, HEAD_DIM).to(dtype).to(device)
    decoded = [
        decode_attention(q, cache[LAYER], table, lens, scale, max(SEQ_LENS), num_splits=2)
        for cache in (layer_major, block_major)
    ]
    assert torch.equal(decoded[0], decoded[1])

    query_lens = [BLOCK_SIZE + 1, 5, 1]
    qp = torch.randn(sum(query_lens), HEADS * GROUP, HEAD_DIM).to(dtype).to(device)
    qsl = query_start_loc(query_lens, device)
    prefilled = [
        prefill_attention(qp, cache[LAYER], qsl, lens, table, scale, max(query_lens))
        for cache in (layer_major, block_major)
    ]
    assert torch.equal(prefilled[0], prefilled[1])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_writes_land_in_the_same_slots_of_a_block_major_cache(device, dtype) -> None:
    num_blocks, tokens = 8, 21
    layer_major, block_major = _caches(device, dtype, num_blocks)
    slots = torch.randperm(num_blocks * BLOCK_SIZE)[:tokens].to(device)
    slots[::6] = -1  # padding rows write nothing
    kv = torch.randn(tokens, 2, HEADS, HEAD_DIM).to(dtype).to(device)
    for cache in (layer_major, block_major):
        kv_write(kv[:, 0], kv[:, 1], cache[LAYER], slots)
    assert torch.equal(layer_major, block_major), "written elsewhere, or into another layer"

    positions = torch.randint(0, 64, (tokens,), device=device)
    cos, sin = rotary_cos_sin(HEAD_DIM, 64, 10000.0, device)
    for cache in (layer_major, block_major):
        qkv = torch.randn(tokens, HEADS * GROUP + 2 * HEADS, HEAD_DIM, generator=torch.Generator().manual_seed(7))
        qkv = qkv.to(dtype).to(device)
        q, k, v = qkv[:, : HEADS * GROUP], qkv[:, HEADS * GROUP : -HEADS], qkv[:, -HEADS:]
        rotary_kv_write(q, k, v, positions, cos, sin, cache[LAYER], slots)
    assert torch.equal(layer_major, block_major)
