"""KV-cache scatter against its torch reference."""

from __future__ import annotations

import pytest
import torch

from engine.kernels.kv_write import kv_write, kv_write_ref
from tests.engine.kernels.paged_cases import requires_cuda


def _check(device, dtype, num_kv_heads, head_dim, block_size, num_tokens):
    num_blocks = 2 * num_tokens // block_size + 3
    cache = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim, device=device).to(dtype)
    # Strided k/v as a model produces them: views into one fused qkv projection output.
    kv = torch.randn(num_tokens, 2, num_kv_heads, head_dim, device=device).to(dtype)
    k, v = kv[:, 0], kv[:, 1]
    slots = torch.randperm(num_blocks * block_size, device=device)[:num_tokens]
    slots[::5] = -1  # padding tokens are skipped
    got, want = cache.clone(), cache.clone()
    kv_write(k, v, got, slots)
    kv_write_ref(k, v, want, slots)
    assert torch.equal(got, want)
    assert not torch.equal(got, cache)


@pytest.mark.parametrize(
    ("dtype", "num_kv_heads", "head_dim", "block_size", "num_tokens"),
    [(torch.bfloat16, 2, 64, 16, 37), (torch.float32, 3, 128, 32, 9), (torch.float16, 1, 80, 16, 17)],
)
def test_kv_write_matches_reference_small(device, dtype, num_kv_heads, head_dim, block_size, num_tokens):
    _check(device, dtype, num_kv_heads, head_dim, block_size, num_tokens)


def test_rejects_bad_inputs(device):
    cache = torch.zeros(2, 4, 16, 2, 64, device=device)
    k = torch.randn(3, 2, 64, device=device)
    slots = torch.tensor([0, 1, 2], device=device)
    with pytest.raises(ValueError, match="slot_mapping must have dtype"):
        kv_write(k, k, cache, slots.int())
    with pytest.raises(ValueError, match="k must have dtype"):
        kv_write(k.half(), k, cache, slots)
    with pytest.raises(ValueError, match="v must be"):
        kv_write(k, torch.randn(3, 1, 64, device=device), cache, slots)
    with pytest.raises(ValueError, match="slot_mapping has 2 entries"):
        kv_write(k, k, cache, slots[:2])


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(
    ("num_kv_heads", "head_dim", "block_size"), [(8, 128, 16), (2, 64, 32), (1, 128, 32)]
)
def test_kv_write_matches_reference_gpu(device, dtype, num_kv_heads, head_dim, block_size):
    _check(device, dtype, num_kv_heads, head_dim, block_size, 4099)
