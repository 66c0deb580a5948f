"""Where the paged KV cache's bytes live.

Every layer reads and writes the cache through one logical tensor (engine/attention/base.py)::

    kv_cache: [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]

Its storage is one of two orders:

- layer-major: that shape, contiguous. One layer's blocks are one range of memory.
- block-major: ``[num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]`` contiguous, seen
  through a permuted view of the shape above. One block *of every layer* is one range of memory, so a
  request's consecutive blocks are a single range: the KV transfer sends them straight from the cache,
  with no gather (kv_transfer/blocks.py), and lands blocks with one copy per run.

Both are the same tensor to a reader that indexes with strides (the Triton kernels). The torch
reference backend reshapes layers with ``view``, which needs layer-major; so block-major is used where
the backend says it reads it (``AttentionBackend.reads_block_major``).
"""

from __future__ import annotations

import torch

TO_BLOCKS_FIRST = (2, 0, 1, 3, 4, 5)  # logical [L, 2, blocks, ...] -> [blocks, L, 2, ...]
TO_LOGICAL = (1, 2, 0, 3, 4, 5)  # and back


def allocate_kv_cache(
    num_layers: int,
    num_blocks: int,
    block_size: int,
    num_kv_heads: int,
    head_dim: int,
    *,
    dtype: torch.dtype,
    device: torch.device | str,
    block_major: bool,
) -> torch.Tensor:
    """A zeroed cache, as the logical ``[num_layers, 2, num_blocks, ...]`` tensor, in the chosen order."""
    if not block_major:
        shape = (num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim)
        return torch.zeros(shape, dtype=dtype, device=device)
    storage = torch.zeros(
        num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim, dtype=dtype, device=device
    )
    return storage.permute(*TO_LOGICAL)


def blocks_first(kv_cache: torch.Tensor) -> torch.Tensor:
    """The cache as ``[num_blocks, num_layers, 2, block_size, heads, head_dim]`` (a view; contiguous
    exactly when the storage is block-major)."""
    return kv_cache.permute(*TO_BLOCKS_FIRST)


def is_block_major(kv_cache: torch.Tensor) -> bool:
    """True when each block's bytes, every layer's K and V, are one contiguous range."""
    return blocks_first(kv_cache).is_contiguous()
