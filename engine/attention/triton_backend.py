"""``TritonAttention``: the attention backend over the Triton paged kernels.

Decode-only batches (every query length 1) go to the split-KV decode kernel; everything else
(chunked prefill, prefix hits, speculative verification, mixed batches) to the varlen causal kernel.

CUDA-graph capturable on the decode path: launch parameters come from the metadata's host ints
(``num_seqs``, ``max_seq_len``) and tensor shapes only; no value is read back from the device and
every allocation's size is fixed by those host ints. A graph captured with a given
``max_seq_len`` stays correct when replayed with longer sequences (the split count is fixed at
capture; chunk lengths are computed on the device), as long as ``block_tables`` is wide enough.
"""

from __future__ import annotations

import torch

from engine.attention.base import AttentionMetadata
from engine.kernels.decode_attention import decode_attention
from engine.kernels.kv_write import kv_write
from engine.kernels.prefill_attention import prefill_attention


class TritonAttention:
    """Paged attention with Triton kernels (see ``engine/kernels``)."""

    name = "triton"
    reads_block_major = True  # every kernel indexes the cache through its strides

    def write_kv(
        self, k: torch.Tensor, v: torch.Tensor, kv_layer: torch.Tensor, slot_mapping: torch.Tensor
    ) -> None:
        kv_write(k, v, kv_layer, slot_mapping)

    def attend(
        self, q: torch.Tensor, kv_layer: torch.Tensor, meta: AttentionMetadata, scale: float
    ) -> torch.Tensor:
        if meta.is_decode_only and q.shape[0] == meta.num_seqs:
            return decode_attention(q, kv_layer, meta.block_tables, meta.seq_lens, scale, meta.max_seq_len)
        return prefill_attention(
            q, kv_layer, meta.query_start_loc, meta.seq_lens, meta.block_tables, scale, meta.max_query_len
        )
