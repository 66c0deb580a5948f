"""``TritonAttention`` through the ``AttentionBackend`` seam: write a step's K/V, then attend."""

from __future__ import annotations

import pytest
import torch

from engine.attention.base import AttentionMetadata, get_attention_backend
from engine.attention.triton_backend import TritonAttention
from engine.kernels.prefill_attention import prefill_attention_ref
from tests.engine.kernels.paged_cases import random_paged_cache, rel_err, requires_cuda

NUM_KV_HEADS, GROUP, HEAD_DIM, BLOCK_SIZE = 2, 4, 64, 16


def _step(device, seq_lens: list[int], query_lens: list[int], dtype=torch.float32):
    """A cache holding each sequence's cached prefix, the step's new K/V and its metadata."""
    kv_layer, table = random_paged_cache(seq_lens, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE, dtype, device)
    slots, starts = [], [0]
    for b, (n, q) in enumerate(zip(seq_lens, query_lens, strict=True)):
        for pos in range(n - q, n):
            slots.append(int(table[b, pos // BLOCK_SIZE]) * BLOCK_SIZE + pos % BLOCK_SIZE)
        starts.append(starts[-1] + q)
    num_tokens = starts[-1]
    meta = AttentionMetadata(
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_tables=table,
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        max_query_len=max(query_lens),
        max_seq_len=max(seq_lens),
        query_lens_cpu=tuple(query_lens),
        seq_lens_cpu=tuple(seq_lens),
    )
    q = torch.randn(num_tokens, NUM_KV_HEADS * GROUP, HEAD_DIM, device=device).to(dtype)
    k = torch.randn(num_tokens, NUM_KV_HEADS, HEAD_DIM, device=device).to(dtype)
    v = torch.randn(num_tokens, NUM_KV_HEADS, HEAD_DIM, device=device).to(dtype)
    return kv_layer, meta, q, k, v


@pytest.mark.parametrize(
    ("seq_lens", "query_lens"),
    [([17, 40, 1], [1, 1, 1]), ([17, 40, 33], [17, 8, 1]), ([50, 31], [4, 4])],
    ids=["decode", "mixed-prefill", "spec-verify"],
)
def test_write_then_attend_matches_reference(device, seq_lens, query_lens):
    kv_layer, meta, q, k, v = _step(device, seq_lens, query_lens)
    backend = TritonAttention()
    backend.write_kv(k, v, kv_layer, meta.slot_mapping)
    # The new tokens' K/V must be where the slots say.
    blocks, offsets = meta.slot_mapping // BLOCK_SIZE, meta.slot_mapping % BLOCK_SIZE
    assert torch.equal(kv_layer[0, blocks, offsets], k) and torch.equal(kv_layer[1, blocks, offsets], v)
    out = backend.attend(q, kv_layer, meta, HEAD_DIM**-0.5)
    ref = prefill_attention_ref(
        q, kv_layer, meta.query_start_loc, meta.seq_lens, meta.block_tables, HEAD_DIM**-0.5
    )
    assert out.shape == q.shape
    assert rel_err(out, ref) <= 1e-4


def test_get_attention_backend_builds_triton():
    assert get_attention_backend("triton", "cpu").name == "triton"


@pytest.mark.gpu
@requires_cuda
def test_decode_step_replays_in_a_cuda_graph(device):
    """Captured once, the decode path replays correctly after the inputs change in place
    (longer sequences, new queries): no host sync, no data-dependent allocation."""
    kv_layer, meta, q, k, v = _step(device, [2048] * 4, [1] * 4, torch.bfloat16)
    backend = TritonAttention()
    scale = HEAD_DIM**-0.5
    backend.attend(q, kv_layer, meta, scale)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = backend.attend(q, kv_layer, meta, scale)
    for lens in ([100, 2000, 37, 515], [1, 2048, 1024, 16], [1, 3, 2047, 17]):
        meta.seq_lens.copy_(torch.tensor(lens, dtype=torch.int32))
        q.copy_(torch.randn_like(q))
        graph.replay()
        ref = prefill_attention_ref(
            q, kv_layer, meta.query_start_loc, meta.seq_lens, meta.block_tables, scale
        )
        assert rel_err(out, ref) <= 1e-2
