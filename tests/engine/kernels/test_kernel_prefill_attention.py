"""Paged varlen causal attention against its torch reference."""

from __future__ import annotations

import itertools

import pytest
import torch

from engine.kernels.prefill_attention import prefill_attention, prefill_attention_ref
from tests.engine.kernels.paged_cases import (
    TOLERANCE,
    query_start_loc,
    random_paged_cache,
    rel_err,
    requires_cuda,
)

NUM_KV_HEADS = 2


def _check(device, dtype, group, head_dim, block_size, seq_lens, query_lens):
    kv_layer, table = random_paged_cache(seq_lens, NUM_KV_HEADS, head_dim, block_size, dtype, device)
    q = torch.randn(sum(query_lens), NUM_KV_HEADS * group, head_dim, device=device).to(dtype)
    qsl = query_start_loc(query_lens, device)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    scale = head_dim**-0.5
    out = torch.full_like(q, float("nan"))  # poisoned: every element must be written
    prefill_attention(q, kv_layer, qsl, lens, table, scale, max(query_lens), out=out)
    ref = prefill_attention_ref(q, kv_layer, qsl, lens, table, scale)
    err = rel_err(out, ref)
    assert err <= TOLERANCE[dtype], (
        f"rel err {err:.2e} (dtype {dtype}, G {group}, D {head_dim}, BS {block_size})"
    )


def _batch(block_size: int) -> tuple[list[int], list[int]]:
    """(seq_lens, query_lens): whole prompts, a prefix hit mid-block, a chunk ending on a block
    boundary, a decode row and a 3-token speculative verification."""
    seq_lens = [block_size + 1, 2 * block_size + 5, 3 * block_size, 2 * block_size - 1, 40]
    query_lens = [block_size + 1, block_size + 2, block_size, 1, 3]
    return seq_lens, query_lens


SMALL_CASES = [  # (dtype, group, head_dim, block_size)
    (torch.bfloat16, 1, 64, 16),
    (torch.bfloat16, 4, 128, 32),
    (torch.float32, 8, 64, 16),
    (torch.float16, 4, 64, 32),
]


@pytest.mark.parametrize(("dtype", "group", "head_dim", "block_size"), SMALL_CASES)
def test_prefill_matches_reference_small(device, dtype, group, head_dim, block_size):
    seq_lens, query_lens = _batch(block_size)
    _check(device, dtype, group, head_dim, block_size, seq_lens, query_lens)


def test_non_power_of_two_group_and_empty_sequence(device):
    """G = 3 leaves padding rows in every tile; a sequence with no new tokens is skipped."""
    _check(device, torch.float32, 3, 64, 16, [17, 9, 33], [17, 0, 5])


def test_rejects_bad_inputs(device):
    kv_layer, table = random_paged_cache([20], 2, 64, 16, torch.float32, device)
    q = torch.randn(4, 4, 64, device=device)
    qsl = query_start_loc([4], device)
    lens = torch.tensor([20], dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="query_start_loc must have dtype"):
        prefill_attention(q, kv_layer, qsl.long(), lens, table, 0.1, 4)
    with pytest.raises(ValueError, match="batch mismatch"):
        prefill_attention(q, kv_layer, qsl[:1], lens, table, 0.1, 4)
    with pytest.raises(ValueError, match="head_dim"):
        prefill_attention(torch.randn(4, 4, 32, device=device), kv_layer, qsl, lens, table, 0.1, 4)
    with pytest.raises(ValueError, match="power of two"):
        kv_odd, table_odd = random_paged_cache([20], 2, 48, 16, torch.float32, device)
        prefill_attention(torch.randn(4, 4, 48, device=device), kv_odd, qsl, lens, table_odd, 0.1, 4)


GPU_GRID = list(
    itertools.product(
        [torch.bfloat16, torch.float16, torch.float32],  # dtype
        [1, 4, 8],  # group (GQA ratio)
        [64, 128],  # head_dim
        [16, 32],  # block_size
    )
)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize(("dtype", "group", "head_dim", "block_size"), GPU_GRID)
def test_prefill_matches_reference_gpu_grid(device, dtype, group, head_dim, block_size):
    seq_lens, query_lens = _batch(block_size)
    # Plus a long prompt processed in one go and a long chunk after a long cached prefix.
    seq_lens += [1000, 64 * block_size + 1]
    query_lens += [1000, 300]
    _check(device, dtype, group, head_dim, block_size, seq_lens, query_lens)
