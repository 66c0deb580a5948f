"""Dense copies of the decoding sequences' contexts, carried from one decode step to the next (CPU).

Batched decode attention reads each sequence's context as ``[B, L, Hkv, D]``. Gathering those
blocks out of the paged cache on every step (per layer, K and V) copies the whole context each
time, although a decode step adds one token per sequence: at batch 32 on a 2-core CPU the gathers
cost about as much as the attention itself. ``DecodeMirror`` keeps, per layer, a dense buffer
``[2, B, capacity, Hkv, D]`` holding the context of the batch's sequences; a step that continues
the previous one (same sequences in the same order, each one token longer, same blocks) appends
only the new tokens' K/V, copied from the cache slots ``write_kv`` just filled. Any other step
rebuilds the buffers from the blocks (what the gather path costs anyway).

Invariants:
  * a buffer is only ever read for the step it was updated in (``serial``); a layer whose buffer
    missed a step (an aborted forward) is rebuilt, never appended to;
  * contents are bit copies of the cache, so attention over them is bit-identical to attention
    over the gathered blocks (same length ``L = blocks * block_size``, same mask); positions past
    a sequence's length are finite (zeros, or stale cache values as the gather gives) and masked;
  * continuity needs the caller's sequence ids (``AttentionMetadata.seq_ids``): without them there
    is no mirror, so a finished sequence's blocks reused by a new one can never be mistaken for it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Most bytes one layer's mirror may hold; larger batches/contexts use the plain gather. 32 sequences
# of 512 tokens of SmolLM2 (3 KV heads of 64) in fp32 take 25 MB.
MAX_BYTES_PER_LAYER = 32 << 20


@dataclass(frozen=True)
class MirrorStep:
    """One decode step's view of the mirrors (shared by every layer of the step)."""

    serial: int  # step number; a layer buffer updated at serial - 1 may be appended to
    carried: bool  # the previous step had these sequences, each one token shorter
    capacity: int  # positions per sequence in the buffers
    length: int  # L: positions attention reads (blocks * block_size)
    slots: torch.Tensor  # int64 [B] cache slots of this step's new tokens
    append_at: torch.Tensor  # int64 [B] their rows in a buffer viewed as [B * capacity]
    block_ids: torch.Tensor  # int64 [B * nb] for a rebuild


@dataclass
class _Buffer:
    kv: torch.Tensor  # [2, B, capacity, Hkv, D]
    serial: int


@dataclass(frozen=True)
class _Previous:
    seq_ids: tuple[str, ...]
    seq_lens: tuple[int, ...]
    table: torch.Tensor  # [B, nb] the blocks read
    capacity: int
    dtype: torch.dtype


class DecodeMirror:
    def __init__(self, max_bytes_per_layer: int = MAX_BYTES_PER_LAYER) -> None:
        self.max_bytes_per_layer = max_bytes_per_layer
        self._serial = 0
        self._previous: _Previous | None = None
        self._buffers: dict[int, _Buffer] = {}  # by the layer's cache data pointer
        self.rebuilds = 0  # layer buffers built from the blocks (tests and tracing)

    def skip(self) -> None:
        """A step that is not decode-only: the next one cannot continue the mirrors."""
        self._previous = None
        self._serial += 1

    def plan(
        self,
        seq_ids: tuple[str, ...] | None,
        seq_lens: tuple[int, ...],
        table: torch.Tensor,  # [B, nb] int32
        slots: torch.Tensor,  # [B] int64
        kv_layer: torch.Tensor,  # any layer: [2, num_blocks, block_size, Hkv, D]
    ) -> MirrorStep | None:
        """Called once per decode-only step (every row one sequence). None: gather instead."""
        previous, self._previous = self._previous, None
        self._serial += 1
        if seq_ids is None:
            return None
        b, nb = table.shape
        _, _, block_size, hkv, d = kv_layer.shape
        length = nb * block_size
        carried = (
            previous is not None
            and previous.seq_ids == seq_ids
            and previous.dtype == kv_layer.dtype
            and length <= previous.capacity
            and all(n == p + 1 for n, p in zip(seq_lens, previous.seq_lens, strict=True))
            and torch.equal(table[:, : previous.table.shape[1]], previous.table)
        )
        # Room to grow by doubling, so a batch decoding n tokens rebuilds O(log n) times.
        capacity = previous.capacity if carried else 2 * length
        per_position = 2 * b * hkv * d * kv_layer.element_size()
        if capacity * per_position > self.max_bytes_per_layer:
            capacity = length + 4 * block_size
            carried = False
            if capacity * per_position > self.max_bytes_per_layer:
                self._buffers.clear()
                return None
        lens = torch.tensor(seq_lens, dtype=torch.int64)
        self._previous = _Previous(seq_ids, seq_lens, table.clone(), capacity, kv_layer.dtype)
        return MirrorStep(
            serial=self._serial,
            carried=carried,
            capacity=capacity,
            length=length,
            slots=slots,
            append_at=torch.arange(b, dtype=torch.int64) * capacity + lens - 1,
            block_ids=table.reshape(-1).long(),
        )

    def read(self, kv_layer: torch.Tensor, step: MirrorStep) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's K and V for the step, ``[B, L, Hkv, D]`` each (views of its buffer),
        after ``write_kv`` has put the step's new tokens into ``kv_layer``."""
        _, num_blocks, block_size, hkv, d = kv_layer.shape
        b = step.append_at.shape[0]
        key = kv_layer.data_ptr()
        buf = self._buffers.get(key)
        if (
            step.carried
            and buf is not None
            and buf.serial == step.serial - 1
            and buf.kv.shape[2] == step.capacity
        ):
            new = kv_layer.view(2, -1, hkv, d).index_select(1, step.slots)  # [2, B, Hkv, D]
            buf.kv.view(2, -1, hkv, d).index_copy_(1, step.append_at, new)
        else:
            self.rebuilds += 1
            kv = torch.empty(2, b, step.capacity, hkv, d, dtype=kv_layer.dtype)
            blocks = kv_layer.view(2, num_blocks, -1).index_select(1, step.block_ids)
            kv[:, :, : step.length] = blocks.view(2, b, step.length, hkv, d)
            kv[:, :, step.length :].zero_()  # read (masked) before appends fill it: must be finite
            buf = self._buffers[key] = _Buffer(kv, step.serial)
        buf.serial = step.serial
        return buf.kv[0, :, : step.length], buf.kv[1, :, : step.length]
