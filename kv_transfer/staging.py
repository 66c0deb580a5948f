"""Reusable staging memory for pieces, and the views of a piece cut out of it once per piece size.

Why: allocating a 256 MiB piece per transfer costs allocator calls (and may synchronize on CUDA), and
cutting a piece into messages and block slabs costs a dozen tensor calls. Each call from Python costs
tens of microseconds on a busy GPU host, and all of them were spent before the first byte moved. So a
sender and a receiver each keep a small pool of buffers (``StagingPool``), shared by their links or
connections: memory grows with the pieces in flight at once, not with the number of peers. A buffer
grows when a larger piece comes, and keeps the views of the last few piece sizes, so a piece of a size
seen before costs no tensor call at all before its copies and messages.

Schedules (plain arithmetic, the same on both ends): a piece travels as ``num_messages`` messages of
``message_bytes`` (the last one shorter), each holding whole blocks (``message_blocks``). The sender
gathers a message's blocks (unless it can send them straight from a block-major cache) and posts it
right behind; the receiver lands, after each message, the blocks that message completed
(``landings``).

Invariants:
- A sender buffer is handed out again only once the last send reading it has completed (``lend``). A
  receiver buffer is given back only once every receive into it completed and every scatter out of
  it finished (``give_back``); a piece cut off by a failure discards its buffer instead.
- Views cover exactly the piece's own bytes. Bytes left over from an earlier, larger piece lie beyond
  ``payload_bytes`` and are never sent or scattered.
"""

from __future__ import annotations

import functools
import threading

import torch
import torch.distributed as dist

from kv_transfer.blocks import as_words, blocks_covered, blocks_needed

MAX_CACHED_SIZES = 8  # piece sizes whose views a buffer keeps; beyond that they are cut afresh
_GRANULE = 2 << 20  # buffers grow in whole 2 MiB steps


@functools.lru_cache(maxsize=256)
def message_blocks(
    payload_bytes: int, message_bytes: int, one_block: int, num_blocks: int
) -> tuple[tuple[int, int], ...]:
    """Per message, the piece blocks ``[lo, hi)`` it carries (the sender's framing: whole blocks)."""
    num_messages = -(-payload_bytes // message_bytes)
    return tuple(
        (
            i * message_bytes // one_block,
            min(num_blocks, blocks_needed(min((i + 1) * message_bytes, payload_bytes), one_block)),
        )
        for i in range(num_messages)
    )


@functools.lru_cache(maxsize=256)
def landings(
    payload_bytes: int, message_bytes: int, one_block: int, num_blocks: int
) -> tuple[tuple[int, int] | None, ...]:
    """Per message, the blocks ``(lo, hi)`` it completes (None when it completes none).

    Any framing works, not only the sender's: a block lands only once every byte of it arrived.
    """
    num_messages = -(-payload_bytes // message_bytes)
    out: list[tuple[int, int] | None] = []
    landed = 0
    for index in range(num_messages):
        end = min((index + 1) * message_bytes, payload_bytes)
        blocks = blocks_covered(end, one_block, num_blocks)
        out.append((landed, blocks) if blocks > landed else None)
        landed = max(landed, blocks)
    return tuple(out)


class PieceViews:
    """One piece's bytes at the start of a staging buffer: its messages, and typed views on demand."""

    def __init__(self, flat: torch.Tensor, message_bytes: int, num_messages: int) -> None:
        self.flat = flat  # exactly the piece's bytes (uint8)
        self.payload_bytes = flat.numel()
        self.message_bytes = message_bytes
        self.messages = [flat[i * message_bytes : (i + 1) * message_bytes] for i in range(num_messages)]
        self._typed: dict[tuple, torch.Tensor] = {}

    def piece(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """The bytes as a ``[n, num_layers, 2, block_size, heads, head_dim]`` tensor."""
        key = (shape, dtype)
        view = self._typed.get(key)
        if view is None:
            view = self._typed[key] = self.flat.view(dtype).view(shape)
        return view

    def slab(
        self, shape: tuple[int, ...], dtype: torch.dtype, word: torch.dtype, lo: int, hi: int
    ) -> torch.Tensor:
        """Blocks ``[lo, hi)`` of the piece as ``[hi - lo, L, 2, words]`` (see ``blocks.as_words``)."""
        key = (shape, dtype, word, lo, hi)
        view = self._typed.get(key)
        if view is None:
            view = self._typed[key] = as_words(self.piece(shape, dtype), word)[lo:hi]
        return view


_TAKEN = object()  # a buffer handed out whose sends are not posted yet


class Staging:
    """A byte buffer, grown on demand, and the views of the last few piece sizes cut from it."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._buffer: torch.Tensor | None = None
        self._views: dict[tuple[int, int, int], PieceViews] = {}
        self._lock = threading.Lock()
        self._busy: object | None = None  # None, _TAKEN, or the last send reading the buffer

    @property
    def capacity(self) -> int:
        return 0 if self._buffer is None else self._buffer.numel()

    def views(self, payload_bytes: int, message_bytes: int, num_messages: int) -> PieceViews:
        """Views of a piece of ``payload_bytes`` at the start of the buffer (grown if too small).

        Growing drops the old buffer and every view of it; a sender's pieces still in flight keep
        their own reference to the old memory, so it is freed only once they are done with it.
        """
        key = (payload_bytes, message_bytes, num_messages)
        views = self._views.get(key)
        if views is not None:
            return views
        if self.capacity < payload_bytes:
            self._views.clear()
            self._buffer = None  # let the allocator reuse the old memory for the new buffer
            size = -(-payload_bytes // _GRANULE) * _GRANULE
            self._buffer = torch.empty(size, dtype=torch.uint8, device=self.device)
        if len(self._views) >= MAX_CACHED_SIZES:
            self._views.clear()
        views = self._views[key] = PieceViews(self._buffer[:payload_bytes], message_bytes, num_messages)
        return views

    # --------------------------------------------------------------- sender: who may write it now

    def try_take(self) -> bool:
        """Hand the buffer out if nothing reads it any more (the last send on it completed)."""
        with self._lock:
            busy = self._busy
            if busy is None or (busy is not _TAKEN and busy.is_completed()):
                self._busy = _TAKEN
                return True
            return False

    def lend(self, last_send: dist.Work) -> None:
        """The buffer's sends are posted: it is busy until ``last_send`` completes (sends complete in order)."""
        with self._lock:
            self._busy = last_send

    def give_back(self) -> None:
        """Nothing reads or writes the buffer any more: it is free now."""
        with self._lock:
            self._busy = None

    def sends_completed(self, last_send: dist.Work) -> None:
        """``last_send`` was seen complete: the buffer is free, unless it was lent again since."""
        with self._lock:
            if self._busy is last_send:
                self._busy = None


class StagingPool:
    """A few reusable buffers shared by a sender's links or a receiver's connections.

    When every pooled buffer is in use (pieces posted faster than they leave, or more pieces arriving
    at once than buffers), a piece gets a one-off buffer instead of waiting.
    """

    def __init__(self, device: torch.device, size: int = 2) -> None:
        self.device = device
        self.size = size
        self._lock = threading.Lock()
        self._buffers: list[Staging] = []

    def discard(self, staging: Staging) -> None:
        """Never hand ``staging`` out again (a piece failed while copies into it may be queued)."""
        with self._lock:
            self._buffers = [b for b in self._buffers if b is not staging]

    def acquire(self) -> Staging:
        for staging in self._buffers:
            if staging.try_take():
                return staging
        with self._lock:
            staging = Staging(self.device)
            staging.try_take()
            if len(self._buffers) < self.size:
                self._buffers = [*self._buffers, staging]  # readers iterate a snapshot
        return staging
