"""Sender over ``torch.distributed`` point-to-point (gloo or nccl), one group per receiver.

Where the time goes in a transfer of a few hundred MiB is host-side calls before the first byte moves
and copies beside the wire, so the common path makes as few of both as it can. When the receiver's
link is connected and idle, ``send`` itself does it all, in the caller's thread and on the caller's
current stream:

1. the piece's header, built from its shape alone, leaves on the control socket, so the receiver posts
   its receives while the sender gets the bytes ready;
2. per message (whole blocks, ``staging.message_blocks``): on a block-major cache whose blocks for the
   message are consecutive, the message *is* that range of the cache, sent with no copy; otherwise the
   blocks are gathered into a reusable staging buffer (``StagingPool``; the views of a piece size are
   cut once), one copy per run of consecutive ids;
3. right behind, the message's send is posted (each NCCL send waits for the stream up to its own
   gather, or up to the caller's work that wrote the blocks).

``send`` returns once everything is issued. Sends straight from the cache read it until they complete,
so the caller keeps the source blocks until ``release`` returned, which waits for such sends (or cuts
the link off). A checksum needs every byte before the header, so a checksummed piece is gathered whole
first.

Otherwise (first piece to a receiver, or pieces already queued) ``send`` gathers the whole piece into
a buffer of its own and queues it; the link thread (kv_transfer/sender_link.py) connects and posts
queued pieces in order. The link thread also reads the receiver's answers, settles each transfer, and
frees the staging buffers whose sends completed.
"""

from __future__ import annotations

import threading
import time
import uuid

import torch
import torch.distributed as dist

from kv_transfer.base import RELEASE_WAIT_S, KVLayout, KVSender, TransferHandle, TransferState, check_piece
from kv_transfer.blocks import BlockMover, CacheBlocks, aligned_message_bytes
from kv_transfer.pair import Backend, parse_address
from kv_transfer.sender_link import Job, Link, Outgoing, SenderConnection
from kv_transfer.staging import PieceViews, Staging, StagingPool, message_blocks
from kv_transfer.wire import CHECKSUMS, Checksum, as_secret, checksum, piece_header

__all__ = ["DEFAULT_MAX_MESSAGE_BYTES", "DistKVSender", "SenderConnection"]
# Big enough that a message's fixed cost is small, small enough that the first gather and the last
# landing copy (the only copies not hidden behind the wire) stay short. 64 MiB was at least as fast
# as 80 MiB in every measured run behind a step (BENCHMARKS.md, KV transfer), block- or layer-major.
DEFAULT_MAX_MESSAGE_BYTES = 64 << 20


class DistKVSender(KVSender):
    def __init__(
        self,
        *,
        backend: str,
        device: torch.device | str,
        secret: bytes | str,
        sender_id: str = "",
        host: str = "127.0.0.1",
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        checksum: str = "none",
        group_timeout: float = 60.0,
    ) -> None:
        if max_message_bytes <= 0:
            raise ValueError("max_message_bytes must be positive")
        self.backend = Backend(backend, torch.device(device))
        self.secret = as_secret(secret)
        self.sender_id = sender_id or f"prefill-{uuid.uuid4().hex[:8]}"
        self.host = host
        self.max_message_bytes = max_message_bytes
        self.checksum = CHECKSUMS[checksum]
        self.group_timeout = group_timeout
        self._lock = threading.Lock()
        self._settled = threading.Condition(self._lock)
        self._transfers: dict[str, Outgoing] = {}
        self._links: dict[str, Link] = {}
        self._closed = False
        self._pool = StagingPool(self.backend.device)
        self._blocks: CacheBlocks | None = None  # the last cache sent from, as the copies see it

    def send(self, handle, src_block_ids, kv_cache, *, dst_block_offset=0, last=True) -> None:
        src = check_piece(handle, src_block_ids, kv_cache, dst_block_offset)
        if kv_cache.device != self.backend.device:
            raise ValueError(f"kv_cache is on {kv_cache.device}, this sender moves {self.backend.device}")
        with self._lock:
            if self._closed:
                raise RuntimeError("sender is closed")
            outgoing = self._transfers.setdefault(handle.handle_id, Outgoing(handle))
            if outgoing.got_last:
                raise ValueError(f"transfer {handle.handle_id} already got its last piece")
            if not src and not last:
                raise ValueError("a piece without blocks must be the last (a bare done marker)")
            outgoing.got_last = last
            piece_index = outgoing.pieces_queued
            outgoing.pieces_queued += 1 if src else 0
            link = self._links.get(handle.address)
            if link is None:
                link = self._links[handle.address] = Link(self, handle.address)
        link.submit(Job(outgoing, dst_block_offset, piece_index, last, src), kv_cache)

    def warm_up(self, address: str) -> bool:
        parse_address(address)  # a malformed address is the caller's error, not a failed link
        with self._lock:
            if self._closed:
                raise RuntimeError("sender is closed")
            link = self._links.get(address)
            if link is None:
                link = self._links[address] = Link(self, address)
        return link.open_soon()

    def poll(self, handle: TransferHandle) -> TransferState:
        with self._lock:
            outgoing = self._get(handle)
            if not outgoing.state.is_terminal and handle.remaining() < 0:
                outgoing.state, outgoing.error = TransferState.FAILED, "deadline exceeded"
            return outgoing.state

    def wait(self, handle: TransferHandle, timeout: float) -> TransferState:
        """Block until the transfer is terminal or ``timeout`` seconds passed; the state then."""
        end = time.monotonic() + timeout
        with self._settled:
            while True:
                outgoing = self._get(handle)
                if not outgoing.state.is_terminal and handle.remaining() < 0:
                    outgoing.state, outgoing.error = TransferState.FAILED, "deadline exceeded"
                left = min(end - time.monotonic(), handle.remaining())
                if outgoing.state.is_terminal or end <= time.monotonic():
                    return outgoing.state
                self._settled.wait(max(left, 1e-4))

    def error(self, handle: TransferHandle) -> str | None:
        self.poll(handle)
        with self._lock:
            return self._get(handle).error

    def release(self, handle: TransferHandle) -> None:
        with self._lock:
            outgoing = self._transfers.pop(handle.handle_id, None)
            if outgoing is not None and not outgoing.state.is_terminal:
                outgoing.state, outgoing.error = TransferState.FAILED, "released by the sender"
                self._settled.notify_all()
            link = self._links.get(handle.address) if outgoing is not None and outgoing.reads_cache else None
        if link is not None:  # its sends may still read the caller's blocks, which are freed next
            link.stop_reading(outgoing, RELEASE_WAIT_S)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            links = list(self._links.values())
            self._links.clear()
            for outgoing in self._transfers.values():
                if not outgoing.state.is_terminal:
                    outgoing.state, outgoing.error = TransferState.FAILED, "sender closed"
            self._settled.notify_all()
        for link in links:
            link.stop()

    def settle(self, outgoing: Outgoing, state: TransferState, error: str | None = None) -> None:
        with self._lock:
            if not outgoing.state.is_terminal:
                outgoing.state, outgoing.error = state, error
                self._settled.notify_all()

    def mark_transferring(self, outgoing: Outgoing) -> None:
        with self._lock:
            if outgoing.state is TransferState.BOOTSTRAPPING:
                outgoing.state = TransferState.TRANSFERRING

    def _get(self, handle: TransferHandle) -> Outgoing:
        outgoing = self._transfers.get(handle.handle_id)
        if outgoing is None:
            raise KeyError(f"unknown transfer handle {handle.handle_id!r}")
        return outgoing

    # ------------------------------------------------------------------------------ gather + post

    def cache_blocks(self, kv_cache: torch.Tensor) -> CacheBlocks:
        """The cache as the copies see it (``blocks.CacheBlocks``), computed once per cache tensor.

        Keyed by the tensor object: a worker passes the same cache tensor to every ``send`` (and
        never resizes it in place); another tensor simply costs the views again.
        """
        cached = self._blocks
        if cached is not None and cached.cache is kv_cache:
            return cached
        self._blocks = CacheBlocks(kv_cache)
        return self._blocks

    def framing(self, layout: KVLayout, num_blocks: int) -> tuple[tuple[int, ...], int, int, int]:
        """``(shape, payload_bytes, message_bytes, num_messages)`` of a piece, as its header says."""
        shape = layout.piece_shape(num_blocks)
        payload_bytes = num_blocks * layout.block_bytes
        message_bytes = min(aligned_message_bytes(self.max_message_bytes, layout.block_bytes), payload_bytes)
        return shape, payload_bytes, message_bytes, -(-payload_bytes // message_bytes)

    def post_piece(
        self, job: Job, kv_cache: torch.Tensor, connection: SenderConnection, deadline: float
    ) -> tuple[list[dist.Work], Staging | None, PieceViews | None]:
        """The direct path: header first, then per message its bytes (straight from a block-major
        cache where its blocks are consecutive there, else gathered) and its send. A staging buffer
        is taken only for a piece with something to gather (None when every message left the cache)."""
        handle, src = job.outgoing.handle, job.src
        layout, device = handle.layout, self.backend.device
        shape, payload, message_bytes, num_messages = self.framing(layout, len(src))
        dtype = layout.torch_dtype
        staging: Staging | None = None
        views: PieceViews | None = None

        def staged() -> PieceViews:
            nonlocal staging, views
            if views is None:
                staging = self._pool.acquire()
                views = staging.views(payload, message_bytes, num_messages)
            return views

        try:
            cache = self.cache_blocks(kv_cache)
            word, mover = cache.words.dtype, BlockMover(src, device)
            if self.checksum != Checksum.CHECKSUM_ALGORITHM_NONE:  # the digest needs every byte first
                mover.gather(cache.words, staged().slab(shape, dtype, word, 0, len(src)), 0, len(src))
                digest = checksum(self.checksum, views.flat)
                connection.send_header(self._header(job, message_bytes, digest), deadline)
                works = connection.post_messages(views.messages)
            else:
                connection.send_header(self._header(job, message_bytes), deadline)
                works = []
                plan = message_blocks(payload, message_bytes, layout.block_bytes, len(src))
                for tag, (lo, hi) in enumerate(plan):
                    message = mover.direct(cache, lo, hi)
                    if message is None:
                        mover.gather(cache.words, staged().slab(shape, dtype, word, lo, hi), lo, hi)
                        message = views.messages[tag]
                    else:
                        job.outgoing.reads_cache = True
                    # Each NCCL send waits for the current stream as it is now: for its own gather.
                    works.append(connection.post_message(message, tag))
        except BaseException:
            if staging is not None:  # never hand it out again, and free it only after its copies ran
                self._pool.discard(staging)
                if device.type == "cuda":
                    torch.cuda.current_stream(device).synchronize()
            raise
        if staging is not None:
            staging.lend(works[-1])
        return works, staging, views

    def discard_staging(self, staging: Staging) -> None:
        self._pool.discard(staging)

    def gather(self, job: Job, kv_cache: torch.Tensor) -> None:
        """Gather the whole piece of a job to be queued, into a buffer of its own.

        ``job.gathered`` (on a GPU) orders the link thread's sends after the gather.
        """
        layout = job.outgoing.handle.layout
        shape, payload, message_bytes, num_messages = self.framing(layout, len(job.src))
        cache = self.cache_blocks(kv_cache)
        views = Staging(self.backend.device).views(payload, message_bytes, num_messages)
        slab = views.slab(shape, layout.torch_dtype, cache.words.dtype, 0, len(job.src))
        BlockMover(job.src, self.backend.device).gather(cache.words, slab, 0, len(job.src))
        job.views, job.message_bytes = views, message_bytes
        if self.backend.device.type == "cuda":
            job.gathered = torch.cuda.Event()
            job.gathered.record()

    def post_gathered(self, job: Job, connection: SenderConnection, deadline: float) -> list[dist.Work]:
        """The queued path (link thread): header, then every message of the gathered piece."""
        digest = b""
        if self.checksum != Checksum.CHECKSUM_ALGORITHM_NONE:
            if job.gathered is not None:  # the digest reads the bytes on the host
                job.gathered.synchronize()
            digest = checksum(self.checksum, job.views.flat)
        if job.gathered is not None:  # this thread's stream, hence the sends, after the gather
            torch.cuda.current_stream().wait_event(job.gathered)
        connection.send_header(self._header(job, job.message_bytes, digest), deadline)
        return connection.post_messages(job.views.messages)

    def _header(self, job: Job, message_bytes: int, digest: bytes = b""):
        handle = job.outgoing.handle
        return piece_header(
            handle, job.dst_block_offset, len(job.src), job.piece_index, message_bytes, self.checksum, digest,
            last=job.last,
        )  # fmt: skip
