"""The attention-backend seam.

KV cache layout (all layers in one tensor so a block of every layer moves as one piece)::

    kv_cache: [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]
    kv_cache[layer]      -> [2, num_blocks, block_size, num_kv_heads, head_dim]   (0 = K, 1 = V)

That is the logical shape; the storage may be block-major (engine/kv_cache/storage.py), in which case
``kv_cache[layer]`` is not contiguous: a backend either indexes through strides or says it cannot
(``reads_block_major``).

A step's tokens are flattened ("varlen"): sequence ``b`` owns query rows
``query_start_loc[b] : query_start_loc[b+1]``. Its context after this step is ``seq_lens[b]`` tokens,
the last ``query_len_b`` of which are the new ones, so query row ``i`` of ``b`` sits at absolute
position ``seq_lens[b] - query_len_b + i`` and attends (causally) to positions ``<=`` that.
Decode is the special case ``query_len_b == 1``; chunked prefill, prefix hits and speculative
verification are all the general case.

Invariant: ``write_kv`` for a layer runs before ``attend`` for that layer in the same step, so the
new tokens' K/V are already in the cache when queries read it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(frozen=True)
class AttentionMetadata:
    """Per-step, per-batch attention inputs shared by every layer."""

    query_start_loc: torch.Tensor  # int32 [B + 1], cumulative query rows
    seq_lens: torch.Tensor  # int32 [B], context length after this step (cached + new)
    block_tables: torch.Tensor  # int32 [B, max_blocks_per_seq], padded with 0
    slot_mapping: torch.Tensor  # int64 [T], cache slot (block_id * block_size + offset) per new token
    max_query_len: int
    max_seq_len: int
    # Host copies, so backends need no device->host sync to loop over sequences.
    query_lens_cpu: tuple[int, ...]
    seq_lens_cpu: tuple[int, ...]
    # Who each sequence is (request ids), for backends that carry per-sequence state from one step
    # to the next (``DecodeMirror``); None: no such state is carried.
    seq_ids: tuple[str, ...] | None = None

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def is_decode_only(self) -> bool:
        return self.max_query_len == 1


class AttentionBackend(Protocol):
    """What a model layer calls. Implementations: ``TorchAttention`` (reference), ``TritonAttention``."""

    name: str
    reads_block_major: bool  # reads a cache whose storage is block-major (strides, never ``view``)

    def write_kv(
        self, k: torch.Tensor, v: torch.Tensor, kv_layer: torch.Tensor, slot_mapping: torch.Tensor
    ) -> None:
        """Scatter new keys/values ``[T, Hkv, D]`` into ``kv_layer`` at ``slot_mapping`` (in place)."""
        ...

    def attend(
        self, q: torch.Tensor, kv_layer: torch.Tensor, meta: AttentionMetadata, scale: float
    ) -> torch.Tensor:
        """Queries ``[T, Hq, D]`` over the paged context; returns ``[T, Hq, D]``. GQA: Hq % Hkv == 0."""
        ...


def get_attention_backend(name: str, device: torch.device | str) -> AttentionBackend:
    """``auto`` picks Triton on CUDA when it imports, else the torch reference."""
    device = torch.device(device)
    if name == "auto":
        name = "triton" if device.type == "cuda" and _triton_available() else "torch"
    if name == "torch":
        from engine.attention.torch_ref import TorchAttention

        return TorchAttention()
    if name == "triton":
        from engine.attention.triton_backend import TritonAttention

        return TritonAttention()
    raise ValueError(f"unknown attention backend {name!r}; expected 'torch', 'triton' or 'auto'")


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
