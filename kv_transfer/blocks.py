"""Copying KV blocks between a paged cache and a contiguous piece, a few layers at a time.

A piece is ``[num_layers, 2, n, block_size, num_kv_heads, head_dim]``: piece block ``p`` is cache
block ``ids[p]`` of every layer. A transfer moves the piece as consecutive byte ranges (messages); when
a message holds whole layers it is the slab ``piece[lo:hi]``. So both ends work on layer ranges: the
sender sends a message as soon as the layers it covers are gathered, and the receiver scatters the
layers a message completes while the next message is still on the wire.

Why two copy paths: block ids that form a few runs of consecutive ids are copied as strided slices
(one plain copy per run and layer range, close to memory bandwidth); ids scattered all over the cache
go through one ``index_select`` / ``index_copy_``. Both see each block as 8-byte words where the
block's size allows, so the indexed kernels move 8 bytes per element instead of 2.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

MAX_RUNS = 8  # more runs than this and one indexed kernel beats a copy per run


def block_runs(block_ids: Sequence[int]) -> list[tuple[int, int, int]]:
    """Maximal runs of consecutive ids, as ``(position in the piece, first id, length)``."""
    runs: list[tuple[int, int, int]] = []
    for position, block in enumerate(block_ids):
        if runs and runs[-1][1] + runs[-1][2] == block:
            start_position, first, length = runs[-1]
            runs[-1] = (start_position, first, length + 1)
        else:
            runs.append((position, int(block), 1))
    return runs


def block_words(tensor: torch.Tensor, word: torch.dtype | None = None) -> torch.Tensor:
    """``[L, 2, blocks, ...]`` seen as ``[L, 2, blocks, words]``: 8-byte words where the bytes allow.

    With ``word`` the view uses exactly that dtype (raises if it cannot): a piece must be seen in the
    same words as the cache it is copied from or to, or the copy would convert values.
    """
    flat = tensor.flatten(3)
    if word is not None:
        return flat if flat.dtype == word else flat.view(word)
    for candidate in (torch.int64, torch.int32):
        if (flat.shape[-1] * flat.element_size()) % candidate.itemsize:
            continue
        try:
            return flat.view(candidate)
        except RuntimeError:  # misaligned storage offset or stride: fall back to narrower words
            continue
    return flat


def index_tensor(block_ids: Sequence[int], device: torch.device) -> torch.Tensor:
    """The ids as a long tensor on ``device``; on CUDA copied without blocking the current stream."""
    ids = torch.tensor(list(block_ids), dtype=torch.long)
    if device.type != "cuda":
        return ids
    return ids.pin_memory().to(device, non_blocking=True)


class BlockMover:
    """Copies layer ranges between ``cache[:, :, block_ids]`` and a contiguous piece.

    Both sides are word views (``block_words``): ``cache_words`` of the whole cache, ``slab`` of the
    piece's layers ``[lo, hi)`` only. One run of consecutive ids is one strided ``copy_`` of every
    layer in the range, with no view of the piece to build; a few runs are a copy each; scattered ids
    are one indexed kernel. Build the mover on the stream that runs the copies (the index, if any,
    is uploaded there).
    """

    def __init__(self, block_ids: Sequence[int], device: torch.device, max_runs: int = MAX_RUNS) -> None:
        runs = block_runs(block_ids)
        self.num_blocks = len(block_ids)
        self.runs = runs if len(runs) <= max_runs else None
        self.index = None if self.runs is not None else index_tensor(block_ids, device)

    def gather(self, cache_words: torch.Tensor, slab: torch.Tensor, lo: int, hi: int) -> None:
        """``slab = cache_words[lo:hi, :, block_ids]``."""
        runs = self.runs
        if runs is None:
            torch.index_select(cache_words[lo:hi], 2, self.index, out=slab)
        elif len(runs) == 1:
            first = runs[0][1]
            slab.copy_(cache_words[lo:hi, :, first : first + self.num_blocks])
        else:
            for position, first, length in runs:
                slab[:, :, position : position + length].copy_(cache_words[lo:hi, :, first : first + length])

    def scatter(self, cache_words: torch.Tensor, slab: torch.Tensor, lo: int, hi: int) -> None:
        """``cache_words[lo:hi, :, block_ids] = slab``."""
        runs = self.runs
        if runs is None:
            cache_words[lo:hi].index_copy_(2, self.index, slab)
        elif len(runs) == 1:
            first = runs[0][1]
            cache_words[lo:hi, :, first : first + self.num_blocks].copy_(slab)
        else:
            for position, first, length in runs:
                cache_words[lo:hi, :, first : first + length].copy_(slab[:, :, position : position + length])


def layer_bytes(piece_shape: Sequence[int], element_size: int) -> int:
    """Bytes of one layer of a piece (its K and V of every block)."""
    return math.prod(piece_shape[1:]) * element_size


def aligned_message_bytes(max_message_bytes: int, one_layer: int) -> int:
    """The largest message size up to ``max_message_bytes`` that holds whole layers (or sub-layer)."""
    if max_message_bytes >= one_layer:
        return (max_message_bytes // one_layer) * one_layer
    return max_message_bytes


def layers_covered(end_byte: int, one_layer: int, num_layers: int) -> int:
    """Layers complete once bytes ``[0, end_byte)`` of a piece are in place."""
    return min(num_layers, end_byte // one_layer)


def layers_needed(end_byte: int, one_layer: int) -> int:
    """Layers that must be gathered before bytes ``[0, end_byte)`` of a piece can be sent."""
    return -(-end_byte // one_layer)


def gather_chunks(num_layers: int, first_layers: int) -> list[int]:
    """Layer ends of the sender's gathers: a first chunk of ``first_layers``, then doubling.

    The first message waits only for the first (small) gather; each later gather is twice the size
    of the previous one, which a copy at several times the link's bandwidth finishes before the
    messages in front of it have left. Few chunks keep the caller's launch overhead low.
    """
    ends, end, size = [], 0, max(1, first_layers)
    while end < num_layers:
        end = min(num_layers, end + size)
        ends.append(end)
        size *= 2
    return ends
