"""The CPU path's shortcuts compute exactly what the plain formulations do (bit for bit where the
formulation only reorders exact operations)."""

from __future__ import annotations

import pytest
import torch

from engine.attention.base import AttentionMetadata
from engine.attention.torch_ref import TorchAttention
from engine.models.layers import RMSNorm, RotaryEmbedding, TorchOps
from engine.sampling.sampler import greedy_argmax


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_is_hf_rotate_half_bit_for_bit(dtype):
    rope = RotaryEmbedding(64, 256, 10000.0, None)
    positions = torch.tensor([0, 3, 200, 254])
    qkv = torch.randn(4, (6 + 2 + 2) * 64).to(dtype)  # fused projection output: q, k, v heads
    q, k, _ = qkv.split([6 * 64, 2 * 64, 2 * 64], dim=-1)
    q, k = q.view(4, 6, 64), k.view(4, 2, 64)
    cos = rope.cos[positions].unsqueeze(1).to(dtype)
    sin = rope.sin[positions].unsqueeze(1).to(dtype)
    want_q, want_k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
    ops = TorchOps()
    got_q, got_k = ops.rotary(positions, q, k, rope)  # adjacent q/k heads: rotated together
    assert torch.equal(got_q, want_q) and torch.equal(got_k, want_k)
    apart_q, apart_k = ops.rotary(positions, q.clone(), k.clone(), rope)  # separate tensors
    assert torch.equal(apart_q, want_q) and torch.equal(apart_k, want_k)
    new_positions = positions + 1  # a new step's positions: the cached tables must not be reused
    step_q, _ = ops.rotary(new_positions, q, k, rope)
    assert torch.equal(
        step_q,
        q * rope.cos[new_positions].unsqueeze(1).to(dtype)
        + _rotate_half(q) * rope.sin[new_positions].unsqueeze(1).to(dtype),
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_is_hf_formula_bit_for_bit(dtype):
    norm = RMSNorm(96, 1e-6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    norm = norm.to(dtype)
    x = (torch.randn(17, 96) * 5).to(dtype)
    x32 = x.float()
    want = norm.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6)).to(dtype)
    assert torch.equal(norm(x), want)


def test_greedy_argmax_is_argmax():
    torch.manual_seed(0)
    logits = torch.randn(5, 4096)
    logits[0, 100] = logits[0, 3000] = 50.0  # a tie: the first maximum wins
    logits[1, 7] = logits[1, 2000] = float("nan")  # NaN counts as the maximum, first one wins
    logits[2] = 1.0  # all equal
    assert torch.equal(greedy_argmax(logits), logits.argmax(dim=-1))
    odd = torch.randn(3, 1000)  # not a multiple of the chunk: plain argmax
    assert torch.equal(greedy_argmax(odd), odd.argmax(dim=-1))


def _decode_meta(block_table: list[list[int]], seq_lens: list[int], block_size: int) -> AttentionMetadata:
    n = len(seq_lens)
    slots = [
        row[(s - 1) // block_size] * block_size + (s - 1) % block_size
        for row, s in zip(block_table, seq_lens, strict=True)
    ]
    return AttentionMetadata(
        query_start_loc=torch.arange(n + 1, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_tables=torch.tensor(block_table, dtype=torch.int32),
        slot_mapping=torch.tensor(slots),
        max_query_len=1,
        max_seq_len=max(seq_lens),
        query_lens_cpu=(1,) * n,
        seq_lens_cpu=tuple(seq_lens),
    )


def _dense_attention(q, kv_layer, table_row, seq_len, scale):
    # q: [Hq, D]; plain softmax(q k^T) v over the sequence's first seq_len cached positions.
    _, _, block_size, hkv, d = kv_layer.shape
    k = kv_layer[0, table_row].reshape(-1, hkv, d)[:seq_len].float()
    v = kv_layer[1, table_row].reshape(-1, hkv, d)[:seq_len].float()
    group = q.shape[0] // hkv
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # [L, Hq, D]
    probs = torch.softmax(torch.einsum("hd,lhd->hl", q.float(), k) * scale, dim=-1)
    return torch.einsum("hl,lhd->hd", probs, v)


@pytest.mark.parametrize("table", [[[3, 4, 5]], [[5, 2, 9]], [[1, 2, 0], [6, 7, 8], [9, 3, 0]]])
def test_decode_attention_gathered_or_sliced_is_dense_attention(table):
    """One sequence with consecutive blocks is read as a slice of the cache, others are gathered
    (padded, masked): both equal plain attention over each sequence's own context."""
    torch.manual_seed(0)
    block_size, hkv, hq, d = 4, 2, 6, 16
    kv_layer = torch.randn(2, 12, block_size, hkv, d)
    seq_lens = [10, 12, 7][: len(table)]
    meta = _decode_meta(table, seq_lens, block_size)
    q = torch.randn(len(table), hq, d)
    attn = TorchAttention()
    out = attn.attend(q, kv_layer, meta, 0.25)
    for b, row in enumerate(table):
        want = _dense_attention(q[b], kv_layer, row, seq_lens[b], 0.25)
        torch.testing.assert_close(out[b], want, rtol=1e-5, atol=1e-5)
    assert (attn._plan.first_block is not None) == (table == [[3, 4, 5]])
