"""Copying KV blocks between a paged cache and a contiguous piece, a few blocks at a time.

A piece is block-major, ``[n, num_layers, 2, block_size, num_kv_heads, head_dim]``: piece block ``p``
is cache block ``ids[p]``, every layer's K and V of it in one contiguous range. A transfer moves the
piece as consecutive byte ranges (messages) of whole blocks, so both ends work on block ranges: the
sender sends a message as soon as its blocks are gathered, the receiver lands the blocks a message
completes while the next message is still on the wire.

The cache's own storage may be block-major too (engine/kv_cache/storage.py). Then a run of consecutive
ids *is* a range of the piece's bytes, and the sender sends it from the cache with no copy at all
(``BlockMover.direct``). Otherwise a few runs are one plain copy each (strided on a layer-major cache),
and ids scattered all over the cache go through one ``index_select`` / ``index_copy_``. Both see each
block as 8-byte words where the block's size allows, so the indexed kernels move 8 bytes per element
instead of 2.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

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


def runs_within(runs: Sequence[tuple[int, int, int]], lo: int, hi: int) -> Iterator[tuple[int, int, int]]:
    """The parts of ``runs`` that fall in piece positions ``[lo, hi)``, in the same form."""
    for position, first, length in runs:
        start, end = max(position, lo), min(position + length, hi)
        if start < end:
            yield start, first + (start - position), end - start


def blocks_first(kv_cache: torch.Tensor) -> torch.Tensor:
    """``[L, 2, num_blocks, ...]`` as ``[num_blocks, L, 2, ...]``: a view, contiguous exactly when the
    cache's storage is block-major. (The engine's own copy is engine/kv_cache/storage.py; this package
    sees tensors only and may not import the engine.)"""
    return kv_cache.permute(2, 0, 1, 3, 4, 5)


def as_words(blocks: torch.Tensor, word: torch.dtype | None = None) -> torch.Tensor:
    """``[n, L, 2, block_size, heads, head_dim]`` seen as ``[n, L, 2, words]``: 8-byte words where the
    bytes allow.

    With ``word`` the view uses exactly that dtype (raises if it cannot): a piece must be seen in the
    same words as the cache it is copied from or to, or the copy would convert values.
    """
    flat = blocks.flatten(3)
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


class CacheBlocks:
    """A ``[num_layers, 2, num_blocks, ...]`` cache as the copies see it, computed once per cache.

    ``words``: ``[num_blocks, L, 2, words]`` (a view, strided unless the storage is block-major).
    ``rows``: on a block-major cache, ``[num_blocks, block_bytes]`` bytes, so that blocks ``[a, b)``
    are the contiguous message ``rows[a:b].view(-1)``; None on a layer-major one.
    """

    def __init__(self, kv_cache: torch.Tensor) -> None:
        self.cache = kv_cache
        blocks = blocks_first(kv_cache)
        self.words = as_words(blocks)
        self.rows = blocks.reshape(len(blocks), -1).view(torch.uint8) if blocks.is_contiguous() else None


def index_tensor(block_ids: Sequence[int], device: torch.device) -> torch.Tensor:
    """The ids as a long tensor on ``device``; on CUDA copied without blocking the current stream."""
    ids = torch.tensor(list(block_ids), dtype=torch.long)
    if device.type != "cuda":
        return ids
    return ids.pin_memory().to(device, non_blocking=True)


class BlockMover:
    """Copies block ranges between ``cache[:, :, block_ids]`` and a contiguous piece.

    ``gather`` / ``scatter`` take the cache's block words (``CacheBlocks.words``) and ``slab``, the
    piece's blocks ``[lo, hi)`` as words. Each run of consecutive ids in the range is one ``copy_``;
    with more than ``max_runs`` runs in the piece, one indexed kernel instead. Build the mover on the
    stream that runs the copies (the index, if any, is uploaded there).
    """

    def __init__(self, block_ids: Sequence[int], device: torch.device, max_runs: int = MAX_RUNS) -> None:
        runs = block_runs(block_ids)
        self.num_blocks = len(block_ids)
        self.runs = runs if len(runs) <= max_runs else None
        self.index = None if self.runs is not None else index_tensor(block_ids, device)

    def direct(self, cache: CacheBlocks, lo: int, hi: int) -> torch.Tensor | None:
        """The bytes of piece blocks ``[lo, hi)`` straight from a block-major cache, when those blocks
        are consecutive there; else None (they must be gathered)."""
        if cache.rows is None or self.runs is None:
            return None
        parts = list(runs_within(self.runs, lo, hi))
        if len(parts) != 1:
            return None
        _, first, length = parts[0]
        return cache.rows[first : first + length].view(-1)

    def gather(self, cache_words: torch.Tensor, slab: torch.Tensor, lo: int, hi: int) -> None:
        """``slab = cache_words[block_ids[lo:hi]]``."""
        if self.runs is None:
            torch.index_select(cache_words, 0, self.index[lo:hi], out=slab)
            return
        for position, first, length in runs_within(self.runs, lo, hi):
            start = position - lo
            part = slab if length == hi - lo else slab[start : start + length]  # one call fewer
            part.copy_(cache_words[first : first + length])

    def scatter(self, cache_words: torch.Tensor, slab: torch.Tensor, lo: int, hi: int) -> None:
        """``cache_words[block_ids[lo:hi]] = slab``."""
        if self.runs is None:
            cache_words.index_copy_(0, self.index[lo:hi], slab)
            return
        for position, first, length in runs_within(self.runs, lo, hi):
            start = position - lo
            part = slab if length == hi - lo else slab[start : start + length]
            cache_words[first : first + length].copy_(part)


def aligned_message_bytes(max_message_bytes: int, one_block: int) -> int:
    """The largest message size up to ``max_message_bytes`` that holds whole blocks (at least one)."""
    return max(1, max_message_bytes // one_block) * one_block


def blocks_covered(end_byte: int, one_block: int, num_blocks: int) -> int:
    """Blocks complete once bytes ``[0, end_byte)`` of a piece are in place."""
    return min(num_blocks, end_byte // one_block)


def blocks_needed(end_byte: int, one_block: int) -> int:
    """Blocks that must be gathered before bytes ``[0, end_byte)`` of a piece can be sent."""
    return -(-end_byte // one_block)
