"""CUDA graphs for decode-only steps, and the pinned host staging that eager GPU steps upload through.

A decode step of a small model is launch-bound: hundreds of small kernels whose host launch cost
exceeds their run time. ``DecodeGraphs`` records a whole decode step (input upload, embedding, every
layer, the LM head) once per batch-size bucket and replays it, so a step costs one graph launch.

Static inputs: one pinned host buffer and its device twin (int32); the graph of bucket ``b`` copies
and reads::

    [input_ids b | positions b | slot_mapping b | seq_lens b | query_start_loc b+1 | block table b x width]

with ``width = ceil(max_model_len / block_size)``.

A step of ``n`` sequences runs in the smallest bucket ``b >= n``; rows ``n..b`` are padding:
token 0 at position 0, slot -1 (the KV write skips it), ``seq_len`` 0 (attention writes zeros).
The graph's logits are ``[b, V]``; the caller samples from the real rows only.

Why it stays correct when replayed: every kernel's launch parameters depend only on ``b`` and on
``max_seq_len = width * block_size`` fixed at capture (the decode kernel's split count; chunk
lengths are computed on the device from ``seq_lens``), never on the step's values. Table entries
past a sequence's length are never read, so they may hold anything.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from engine.attention.base import AttentionBackend, AttentionMetadata

logger = logging.getLogger(__name__)


def graph_batch_sizes(max_batch: int) -> tuple[int, ...]:
    """Buckets 1, 2, 4, 8, then every 8 up to 64, every 16 up to 128, every 32 beyond; the last
    bucket is ``max_batch`` itself. Padding a step to its bucket costs little: decode is bound by
    reading the weights, which does not grow with the batch."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    sizes = [1, 2, 4, 8, *range(16, 65, 8), *range(80, 129, 16), *range(160, max_batch + 1, 32)]
    out = sorted({s for s in sizes if s < max_batch} | {max_batch})
    return tuple(out)


# Buckets up to this size also get a device-fed twin (``DecodeGraphs.run_fed``): lookahead decoding.
FED_MAX_BATCH = 64
# Up to this many rows a step's inputs are packed element by element: a few scalar writes cost
# less host time than the dozen numpy calls of the general path (tens of microseconds at batch 1,
# during which the device idles).
SMALL_PACK_ROWS = 8


def pack_decode_inputs(
    host: np.ndarray,
    b: int,
    width: int,
    block_size: int,
    token_ids: list[int],
    positions: list[int],
    block_ids: list[list[int]],
    small_rows: int = SMALL_PACK_ROWS,
) -> None:
    """Write the inputs of a decode step of ``n = len(token_ids)`` sequences padded to bucket ``b``
    into ``host`` (layout in the module docstring; padding rows: token 0, position 0, slot -1,
    seq_len 0). Table entries past a sequence's blocks are left as they were (never read)."""
    n, bs = len(token_ids), block_size
    table_at = 5 * b + 1
    if b <= small_rows:
        for i in range(b):
            if i < n:
                p = positions[i]
                host[i] = token_ids[i]
                host[b + i] = p
                host[2 * b + i] = block_ids[i][p // bs] * bs + p % bs
                host[3 * b + i] = p + 1
            else:
                host[i] = host[b + i] = host[3 * b + i] = 0
                host[2 * b + i] = -1
        for i in range(b + 1):
            host[4 * b + i] = min(i, n)
        for i, blocks in enumerate(block_ids):
            row = blocks[:width]
            host[table_at + i * width : table_at + i * width + len(row)] = row
        return
    pos = np.asarray(positions, dtype=np.int64)
    host[0:n] = token_ids
    host[n:b] = 0
    host[b : b + n] = pos
    host[b + n : 2 * b] = 0
    last_blocks = [blocks[p // bs] for blocks, p in zip(block_ids, positions, strict=True)]
    host[2 * b : 2 * b + n] = np.asarray(last_blocks, dtype=np.int64) * bs + pos % bs
    host[2 * b + n : 3 * b] = -1
    host[3 * b : 3 * b + n] = pos + 1
    host[3 * b + n : 4 * b] = 0
    host[4 * b : 5 * b + 1] = np.minimum(np.arange(b + 1), n)
    # Whole rows of the block table travel; entries past a sequence's end are never read.
    table = host[table_at : table_at + b * width].reshape(b, width)
    for i, blocks in enumerate(block_ids):
        row = blocks[:width]
        table[i, : len(row)] = row


class PinnedStaging:
    """Reusable pinned host buffers for a step's integer inputs: one host->device copy per step.

    Two buffers alternate. A buffer is rewritten only after the copy that last read it completed
    (an event recorded after each upload), so a step may be prepared while the previous one runs.
    """

    def __init__(self, num_buffers: int = 2) -> None:
        self._buffers: list[torch.Tensor | None] = [None] * num_buffers
        self._events: list[torch.cuda.Event | None] = [None] * num_buffers
        self._next = 0
        self._current = 0

    def host(self, size: int) -> np.ndarray:
        """An int32 numpy view of ``size`` elements of the next free pinned buffer."""
        i = self._next
        event = self._events[i]
        if event is not None:
            event.synchronize()
        buf = self._buffers[i]
        if buf is None or buf.numel() < size:
            buf = torch.empty(max(4096, 1 << (size - 1).bit_length()), dtype=torch.int32, pin_memory=True)
            self._buffers[i] = buf
        self._current = i
        return buf.numpy()[:size]

    def upload(self, dst: torch.Tensor, size: int) -> None:
        """Copy the first ``size`` elements of the buffer last returned by ``host`` into ``dst``."""
        i = self._current
        dst[:size].copy_(self._buffers[i][:size], non_blocking=True)
        event = self._events[i] or torch.cuda.Event()
        event.record()
        self._events[i] = event
        self._next = (i + 1) % len(self._buffers)


class DecodeGraphs:
    """Decode-step CUDA graphs over batch-size buckets, captured lazily (or all at once by
    ``capture_all``) into one shared memory pool.

    Requires a model whose ops never sync with the host (``TritonOps`` + Triton attention).
    Graph outputs live in the shared pool: the logits of one replay are valid until the next one.

    The host->device copy of the step's inputs is itself part of the graph: each graph starts by
    copying its slice of one fixed pinned host buffer into the device buffer it reads. A step is
    then numpy writes into pinned memory plus a single graph launch (framework ops cost tens of
    microseconds of host time each, as much as a small model's whole layer on the device). The
    host buffer is rewritten only after the previous replay has finished (an event).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        kv_cache: torch.Tensor,
        attn: AttentionBackend,
        block_size: int,
        max_model_len: int,
        max_batch: int,
    ) -> None:
        self.model, self.kv_cache, self.attn, self.block_size = model, kv_cache, attn, block_size
        self.sizes = graph_batch_sizes(max_batch)
        self.max_batch = self.sizes[-1]
        self.width = -(-max_model_len // block_size)
        self.max_context = self.width * block_size
        capacity = self._input_size(self.max_batch)
        self.host_inputs = torch.zeros(capacity, dtype=torch.int32, pin_memory=True)
        self._host = self.host_inputs.numpy()
        self.inputs = torch.zeros(capacity, dtype=torch.int32, device=kv_cache.device)
        self.upload_in_graph = True  # cleared if this CUDA/torch cannot capture the copy
        self._replayed = torch.cuda.Event()
        self._pending = False
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        # Device-fed twins of the buckets up to FED_MAX_BATCH (see ``run_fed``): their token ids come
        # from ``feed`` on the device, the rest of their inputs through their own pinned staging.
        self.fed_graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.feed = torch.zeros(self.max_batch, dtype=torch.int32, device=kv_cache.device)
        self._fed_staging = PinnedStaging()
        self._rows: dict[tuple[int, int, bool], torch.Tensor] = {}  # (bucket, n, fed) -> logits[:n]
        self.pool = torch.cuda.graph_pool_handle()

    def _input_size(self, b: int) -> int:
        return 5 * b + 1 + b * self.width

    def bucket(self, num_seqs: int) -> int | None:
        """The smallest bucket holding ``num_seqs`` sequences, or None (run eagerly)."""
        for size in self.sizes:
            if size >= num_seqs:
                return size
        return None

    # --- capture -----------------------------------------------------------------------------
    def _upload(self, b: int) -> None:
        size = self._input_size(b)
        self.inputs[:size].copy_(self.host_inputs[:size], non_blocking=True)

    def _forward(self, b: int, fed: bool = False) -> torch.Tensor:
        size = self._input_size(b)
        if fed:
            self.inputs[:b].copy_(self.feed[:b])  # token ids: the previous step's, never on the host
        elif self.upload_in_graph:
            self._upload(b)
        header = self.inputs[: 5 * b + 1]
        longs = header[: 3 * b].long()  # ids, positions, slots: int64 for embedding/index ops
        meta = AttentionMetadata(
            query_start_loc=header[4 * b : 5 * b + 1],
            seq_lens=header[3 * b : 4 * b],
            block_tables=self.inputs[5 * b + 1 : size].view(b, self.width),
            slot_mapping=longs[2 * b : 3 * b],
            max_query_len=1,
            max_seq_len=self.max_context,
            query_lens_cpu=(1,) * b,
            seq_lens_cpu=(self.max_context,) * b,
        )
        hidden = self.model(longs[:b], longs[b : 2 * b], self.kv_cache, meta, self.attn)
        return self.model.compute_logits(hidden)  # [b, V] fp32

    @torch.inference_mode()
    def capture(self, b: int) -> None:
        if b not in self.sizes:
            raise ValueError(f"{b} is not a graph bucket ({self.sizes})")
        if b in self.graphs:
            return
        start = time.perf_counter()
        self._wait_for_replay()
        # All-padding inputs: valid for any kernel, touch no cache slot.
        self._host[: 5 * b + 1] = 0
        self._host[2 * b : 3 * b] = -1
        if not self.upload_in_graph:
            self._upload(b)
        self._forward(b)  # warm-up: Triton compiles and cuBLAS picks its kernels outside the capture
        torch.cuda.synchronize()
        try:
            graph, logits = self._record(b)
        except RuntimeError as exc:
            if not self.upload_in_graph or self.graphs:
                raise
            logger.warning("cannot capture the input copy (%s); uploading before each replay", exc)
            self.upload_in_graph = False
            graph, logits = self._record(b)
        self.graphs[b] = (graph, logits)
        logger.info("captured decode CUDA graph for batch %d in %.2f s", b, time.perf_counter() - start)

    def _record(self, b: int, fed: bool = False) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = self._forward(b, fed)
        torch.cuda.synchronize()
        return graph, logits

    @torch.inference_mode()
    def capture_fed(self, b: int) -> None:
        """The device-fed twin of bucket ``b`` (``b <= FED_MAX_BATCH``)."""
        if b not in self.sizes or b > FED_MAX_BATCH:
            raise ValueError(f"{b} is not a device-fed graph bucket")
        if b in self.fed_graphs:
            return
        # All-padding inputs (slot -1): the warm-up touches no cache slot.
        size = self._input_size(b)
        host = self._fed_staging.host(size)
        host[:] = 0
        host[2 * b : 3 * b] = -1
        self._fed_staging.upload(self.inputs, size)
        self._forward(b, fed=True)
        torch.cuda.synchronize()
        self.fed_graphs[b] = self._record(b, fed=True)

    def capture_all(self, max_batch: int | None = None) -> float:
        """Capture every bucket up to ``max_batch`` (largest first, so smaller graphs reuse its
        pool memory). Returns the seconds it took."""
        start = time.perf_counter()
        sizes = [s for s in self.sizes if max_batch is None or s <= max(max_batch, 1)]
        for i, b in enumerate(reversed(sizes)):
            self.capture(b)
            logger.info("decode CUDA graphs: %d/%d captured", i + 1, len(sizes))
        for b in reversed(sizes):
            if b <= FED_MAX_BATCH:
                self.capture_fed(b)
        return time.perf_counter() - start

    # --- replay ------------------------------------------------------------------------------
    def _wait_for_replay(self) -> None:
        if self._pending:
            self._replayed.synchronize()  # its graph's first node still has to read the host buffer
            self._pending = False

    def run(self, token_ids: list[int], positions: list[int], block_ids: list[list[int]]) -> torch.Tensor:
        """One decode step of ``n = len(token_ids)`` sequences (one new token each, at
        ``positions``, whose K/V slot lies in ``block_ids[i]``). Returns the logits of the ``n``
        real rows, ``[n, V]`` fp32, valid until the next replay."""
        n = len(token_ids)
        b = self.bucket(n)
        if b is None:
            raise ValueError(f"batch of {n} exceeds the largest graph bucket {self.max_batch}")
        if b not in self.graphs:
            self.capture(b)
        self._wait_for_replay()
        self._pack(b, token_ids, positions, block_ids)
        if not self.upload_in_graph:
            self._upload(b)
        graph, logits = self.graphs[b]
        graph.replay()
        self._replayed.record()
        self._pending = True
        return self._logits_rows(b, n, False, logits)

    def run_fed(self, token_ids: torch.Tensor, positions: list[int], block_ids: list[list[int]]) -> torch.Tensor | None:
        """A decode step whose token ids are already on the device (``token_ids`` [n], e.g. the
        argmax of the step still running): launched without waiting for them to reach the host.
        Returns the logits rows like ``run``, or None when no device-fed graph fits ``n``.

        Its inputs go through their own pinned staging (the step before may not have read
        ``host_inputs`` yet), uploaded in stream order after the steps already launched."""
        n = len(positions)
        b = self.bucket(n)
        if b is None or b > FED_MAX_BATCH:
            return None
        if b not in self.fed_graphs:
            self.capture_fed(b)
        size = self._input_size(b)
        host = self._fed_staging.host(size)
        pack_decode_inputs(host, b, self.width, self.block_size, [0] * n, positions, block_ids)
        self._fed_staging.upload(self.inputs, size)
        self.feed[:n].copy_(token_ids)
        graph, logits = self.fed_graphs[b]
        graph.replay()
        return self._logits_rows(b, n, True, logits)

    def _logits_rows(self, b: int, n: int, fed: bool, logits: torch.Tensor) -> torch.Tensor:
        """``logits[:n]`` of bucket ``b``'s graph, the view cut once (a replay costs no tensor call)."""
        rows = self._rows.get((b, n, fed))
        if rows is None:
            rows = self._rows[b, n, fed] = logits[:n]
        return rows

    def _pack(self, b: int, token_ids: list[int], positions: list[int], block_ids: list[list[int]]) -> None:
        pack_decode_inputs(self._host, b, self.width, self.block_size, token_ids, positions, block_ids)
