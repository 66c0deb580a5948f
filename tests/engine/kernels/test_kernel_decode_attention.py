"""Paged decode attention (split-KV, GQA) against its torch reference."""

from __future__ import annotations

import itertools

import pytest
import torch

from engine.kernels.decode_attention import choose_num_splits, decode_attention, decode_attention_ref
from tests.engine.kernels.paged_cases import TOLERANCE, random_paged_cache, rel_err, requires_cuda

NUM_KV_HEADS = 2


def _lengths(block_size: int, longest: int) -> list[int]:
    """Odd lengths and block boundaries (k*block_size, +-1), plus one long context."""
    return [1, block_size - 1, block_size, block_size + 1, 2 * block_size + 7, 3 * block_size, longest]


def _check(device, dtype, group, head_dim, block_size, seq_lens, num_splits):
    kv_layer, table = random_paged_cache(seq_lens, NUM_KV_HEADS, head_dim, block_size, dtype, device)
    q = torch.randn(len(seq_lens), NUM_KV_HEADS * group, head_dim, device=device).to(dtype)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    scale = head_dim**-0.5
    out = torch.full_like(q, float("nan"))  # poisoned: every element must be written
    decode_attention(q, kv_layer, table, lens, scale, max(seq_lens), num_splits=num_splits, out=out)
    ref = decode_attention_ref(q, kv_layer, table, lens, scale)
    err = rel_err(out, ref)
    assert err <= TOLERANCE[dtype], (
        f"rel err {err:.2e} (dtype {dtype}, G {group}, D {head_dim}, BS {block_size})"
    )


SMALL_CASES = [  # (dtype, group, head_dim, block_size)
    (torch.bfloat16, 1, 64, 16),
    (torch.bfloat16, 4, 128, 32),
    (torch.float32, 8, 64, 16),
    (torch.float16, 4, 64, 32),
    (torch.float32, 1, 128, 32),
]


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize(("dtype", "group", "head_dim", "block_size"), SMALL_CASES)
def test_decode_matches_reference_small(device, dtype, group, head_dim, block_size, num_splits):
    _check(device, dtype, group, head_dim, block_size, _lengths(block_size, 5 * block_size - 1), num_splits)


def test_zero_length_rows_give_zeros_not_nan(device):
    """CUDA-graph padding rows (seq_len 0) must produce finite zeros, split or not."""
    kv_layer, table = random_paged_cache([16, 16], 1, 64, 16, torch.float32, device)
    q = torch.randn(2, 2, 64, device=device)
    lens = torch.tensor([0, 16], dtype=torch.int32, device=device)
    for splits in (1, 2):
        out = decode_attention(q, kv_layer, table, lens, 0.125, 16, num_splits=splits)
        assert torch.equal(out[0], torch.zeros_like(out[0]))
        assert rel_err(out[1:], decode_attention_ref(q, kv_layer, table, lens, 0.125)[1:]) <= 1e-4


def test_split_count_fills_the_gpu_in_one_wave():
    assert choose_num_splits(batch=1, num_kv_heads=8, max_seq_len=32768, num_sms=132) == 64
    assert choose_num_splits(batch=1, num_kv_heads=8, max_seq_len=300, num_sms=132) == 5
    assert choose_num_splits(batch=16, num_kv_heads=8, max_seq_len=4096, num_sms=132) == 4
    assert choose_num_splits(batch=32, num_kv_heads=8, max_seq_len=4096, num_sms=132) == 2
    assert choose_num_splits(batch=64, num_kv_heads=8, max_seq_len=4096, num_sms=132) == 1
    assert choose_num_splits(batch=0, num_kv_heads=8, max_seq_len=0, num_sms=132) == 1


def test_rejects_bad_inputs(device):
    kv_layer, table = random_paged_cache([20], 2, 64, 16, torch.float32, device)
    q = torch.randn(1, 4, 64, device=device)
    lens = torch.tensor([20], dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="block_tables must have dtype"):
        decode_attention(q, kv_layer, table.long(), lens, 0.1, 20)
    with pytest.raises(ValueError, match="kv_layer must have dtype"):
        decode_attention(q.half(), kv_layer, table, lens, 0.1, 20)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        decode_attention(torch.randn(1, 3, 64, device=device), kv_layer, table, lens, 0.1, 20)
    with pytest.raises(ValueError, match="batch mismatch"):
        decode_attention(q, kv_layer, table, torch.tensor([20, 3], dtype=torch.int32, device=device), 0.1, 20)
    with pytest.raises(ValueError, match="exceeds block_tables capacity"):
        decode_attention(q, kv_layer, table, lens, 0.1, 10_000)
    with pytest.raises(ValueError, match="contiguous in its last dim"):
        decode_attention(q.transpose(1, 2).contiguous().transpose(1, 2), kv_layer, table, lens, 0.1, 20)


GPU_GRID = list(
    itertools.product(
        [torch.bfloat16, torch.float16, torch.float32],  # dtype
        [1, 4, 8],  # group (GQA ratio)
        [64, 128],  # head_dim
        [16, 32],  # block_size
    )
)


@pytest.mark.parametrize(("dtype", "group", "head_dim", "block_size"), GPU_GRID)
@pytest.mark.parametrize("splits", ["auto", "one"])
@pytest.mark.gpu
@requires_cuda
def test_decode_matches_reference_gpu_grid(device, dtype, group, head_dim, block_size, splits):
    seq_lens = _lengths(block_size, 3001) + [64 * block_size, 64 * block_size + 1]
    _check(device, dtype, group, head_dim, block_size, seq_lens, None if splits == "auto" else 1)
