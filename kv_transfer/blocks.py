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


def block_words(tensor: torch.Tensor) -> torch.Tensor:
    """``[L, 2, blocks, ...]`` seen as ``[L, 2, blocks, words]``, 8-byte words where the bytes allow."""
    flat = tensor.flatten(3)
    for word in (torch.int64, torch.int32):
        if (flat.shape[-1] * flat.element_size()) % word.itemsize:
            continue
        try:
            return flat.view(word)
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

    Build it on the stream that will run the copies (the index, if any, is uploaded there).
    """

    def __init__(self, block_ids: Sequence[int], device: torch.device, max_runs: int = MAX_RUNS) -> None:
        runs = block_runs(block_ids)
        self.num_blocks = len(block_ids)
        self.runs = runs if len(runs) <= max_runs else None
        self.index = None if self.runs is not None else index_tensor(block_ids, device)

    def gather(self, cache: torch.Tensor, piece: torch.Tensor, lo: int, hi: int) -> None:
        """``piece[lo:hi] = cache[lo:hi, :, block_ids]``."""
        source, target = block_words(cache[lo:hi]), block_words(piece[lo:hi])
        if self.runs is None:
            torch.index_select(source, 2, self.index, out=target)
            return
        for position, first, length in self.runs:
            target[:, :, position : position + length].copy_(source[:, :, first : first + length])

    def scatter(self, cache: torch.Tensor, piece: torch.Tensor, lo: int, hi: int) -> None:
        """``cache[lo:hi, :, block_ids] = piece[lo:hi]``."""
        target, source = block_words(cache[lo:hi]), block_words(piece[lo:hi])
        if self.runs is None:
            target.index_copy_(2, self.index, source)
            return
        for position, first, length in self.runs:
            target[:, :, first : first + length].copy_(source[:, :, position : position + length])


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
