"""Sender over ``torch.distributed`` point-to-point (gloo or nccl), one group per receiver.

Where the time goes in a transfer is thread hand-offs, not copies, so the common path has none: when
the receiver's link is connected and idle, ``send`` itself sends the piece's header, then gathers the
piece one message at a time on a side stream and posts each message's send right behind its gather
(the send's stream waits for that gather only). The receiver validates the header while the first
layers are being copied, and the bytes flow as soon as it posts its receives. ``send`` returns once
everything is issued; the caller's stream waits for the gathers, so reusing the source blocks
afterwards is safe in stream order.

Otherwise (first piece to a receiver, or pieces already queued) ``send`` gathers the whole piece and
queues it; the link thread (kv_transfer/sender_link.py) connects and posts queued pieces in order. The
link thread also reads the receiver's answers and settles each transfer.
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import Iterator

import torch
import torch.distributed as dist

from baton.v1 import kv_transfer_pb2
from kv_transfer.base import KVSender, TransferHandle, TransferState, check_piece
from kv_transfer.blocks import BlockMover, aligned_message_bytes, layer_bytes, layers_needed
from kv_transfer.pair import RECEIVER_RANK, Backend
from kv_transfer.sender_link import Job, Link, Outgoing, SenderConnection
from kv_transfer.wire import CHECKSUMS, Checksum, as_secret, build_header, message_views

__all__ = ["DEFAULT_MAX_MESSAGE_BYTES", "DistKVSender", "SenderConnection"]
# Big enough that a message's fixed cost is small, small enough that the first gather and the last
# scatter (the only copies not hidden behind the wire) stay short.
DEFAULT_MAX_MESSAGE_BYTES = 80 << 20


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
        device = self.backend.device
        self._gather_stream = torch.cuda.Stream(device) if device.type == "cuda" else None

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

    @contextlib.contextmanager
    def on_gather_stream(self, device: torch.device) -> Iterator[None]:
        """Run the body on the gather stream, after the caller's pending work; the caller's stream
        then waits for what the body issued there (the gathers; sends run on NCCL's own stream)."""
        if self._gather_stream is None:
            yield
            return
        caller = torch.cuda.current_stream(device)
        self._gather_stream.wait_stream(caller)
        try:
            with torch.cuda.stream(self._gather_stream):
                yield
        finally:
            caller.wait_stream(self._gather_stream)

    def gather(self, job: Job, kv_cache: torch.Tensor) -> None:
        """Gather the whole piece for a queued job (``job.gathered`` orders later readers after it)."""
        shape = job.outgoing.handle.layout.piece_shape(len(job.src))
        with self.on_gather_stream(kv_cache.device):
            job.piece = torch.empty(shape, dtype=kv_cache.dtype, device=kv_cache.device)
            BlockMover(job.src, kv_cache.device).gather(kv_cache, job.piece, 0, shape[0])
            if self._gather_stream is not None:
                job.gathered = torch.cuda.Event()
                job.gathered.record()

    def header_for(self, job: Job) -> kv_transfer_pb2.TransferHeader:
        """The gathered piece's descriptor (a checksum reads the bytes, so waits for the gather)."""
        if self.checksum != Checksum.CHECKSUM_ALGORITHM_NONE and job.gathered is not None:
            job.gathered.synchronize()
        one_layer = layer_bytes(job.piece.shape, job.piece.element_size())
        message_bytes = aligned_message_bytes(self.max_message_bytes, one_layer)
        handle = job.outgoing.handle
        return build_header(
            handle, job.dst_block_offset, job.piece, job.piece_index, message_bytes, self.checksum
        )

    def gather_and_post(
        self, job: Job, kv_cache: torch.Tensor, connection: SenderConnection, deadline: float
    ) -> list[dist.Work]:
        """Header first, then per message: gather its layers, post its send (the pipelined path)."""
        layout, device = job.outgoing.handle.layout, kv_cache.device
        shape = layout.piece_shape(len(job.src))
        with self.on_gather_stream(device):
            job.piece = piece = torch.empty(shape, dtype=kv_cache.dtype, device=device)
            mover, gathered = BlockMover(job.src, device), 0
            if self.checksum != Checksum.CHECKSUM_ALGORITHM_NONE:  # the digest needs every byte first
                mover.gather(kv_cache, piece, 0, layout.num_layers)
                gathered = layout.num_layers
            header = self.header_for(job)
            connection.send_header(header, deadline)
            one_layer = layer_bytes(shape, piece.element_size())
            works = []
            for tag, view in enumerate(message_views(piece, header)):
                needed = layers_needed(min((tag + 1) * header.message_bytes, header.payload_bytes), one_layer)
                if needed > gathered:
                    mover.gather(kv_cache, piece, gathered, needed)
                    gathered = needed
                # The send's stream waits for the current (gather) stream: for these layers only.
                works.append(connection.group.send([view], RECEIVER_RANK, tag))
        return works
