"""Builders of random paged-attention inputs shared by the kernel tests."""

from __future__ import annotations

import pytest
import torch

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in fp64; NaN anywhere fails."""
    out64, ref64 = out.double(), ref.double()
    if not torch.isfinite(out64).all():
        return float("inf")
    return ((out64 - ref64).norm() / ref64.norm().clamp_min(1e-30)).item()


def random_paged_cache(
    seq_lens: list[int],
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    device,
    spare: int = 3,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A random ``kv_layer`` and a block table of random, non-contiguous, non-shared blocks.

    Table rows are padded with 0 beyond each sequence's blocks (as the engine pads them) and the
    table is one column wider than needed, so kernels must not trust its width.
    """
    blocks_per_seq = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(blocks_per_seq) + spare
    kv_layer = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim, dtype=torch.float32).to(dtype)
    perm = torch.randperm(num_blocks)
    table = torch.zeros(len(seq_lens), max(blocks_per_seq, default=0) + 1, dtype=torch.int32)
    used = 0
    for b, n in enumerate(blocks_per_seq):
        table[b, :n] = perm[used : used + n].int()
        used += n
    return kv_layer.to(device), table.to(device)


def query_start_loc(query_lens: list[int], device) -> torch.Tensor:
    starts = [0]
    for n in query_lens:
        starts.append(starts[-1] + n)
    return torch.tensor(starts, dtype=torch.int32, device=device)
