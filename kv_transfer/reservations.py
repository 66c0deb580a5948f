"""Receiver-side bookkeeping shared by every transport: reservations, header checks, landing pieces.

Flow for one piece: ``accept_header`` validates the descriptor against the reservation and returns a
``PieceTicket`` (the staging tensor to receive into); the transport fills it. Then either ``land``
verifies the checksum and lands the whole piece, or (no checksum) ``land_blocks`` lands the blocks
each message completes while later messages are still arriving, and ``complete_piece`` marks the
piece landed once every landing copy finished. ``finish`` handles the done marker.

A transport may also receive messages straight into the reserved blocks of a block-major cache
(``cache_targets``), after the header passed: it registers itself first (``begin_cache_writes``) and
deregisters once those receives completed or its link was torn down (``end_cache_writes``,
``writer_gone``).

Thread-safety: one table lock guards the dict and every reservation's fields. Scatters are issued
under the reservation's own lock, which ``release`` also takes; ``release`` then waits for the stream
the scatters were issued on (``last_write``), and for receives posted into the blocks (to complete
within ``RELEASE_WAIT_S``, else it cuts their link off and waits until it is down), so once it returns
nothing more is written into the reservation's blocks. The scatters' stream never waits on anything
unbounded: a transport makes it wait for a message only after the message was seen complete.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from baton.v1 import kv_transfer_pb2
from kv_transfer.base import (
    RELEASE_WAIT_S,
    KVLayout,
    TransferError,
    TransferHandle,
    TransferState,
    check_block_ids,
)
from kv_transfer.blocks import BlockMover, CacheBlocks
from kv_transfer.staging import PieceViews, Staging, message_blocks
from kv_transfer.wire import Checksum, checksum

_CHECKSUM_SIZES = {
    Checksum.CHECKSUM_ALGORITHM_NONE: 0,
    Checksum.CHECKSUM_ALGORITHM_CRC32: 4,
    Checksum.CHECKSUM_ALGORITHM_SHA256: 32,
}


# How long past a reservation's deadline a release waits for a cut-off writer's link to come down.
CUT_OFF_MARGIN_S = 5.0

log = logging.getLogger(__name__)


class CacheWriter(Protocol):
    """What posts receives straight into reserved blocks: a link that can be cut off."""

    def abort(self, reason: str) -> None:
        """Cut the link off without waiting: its receives end (by the reservation's deadline at the
        latest), then the link is torn down and the table told (``writer_gone``)."""


@dataclass
class _Reservation:
    handle: TransferHandle
    state: TransferState = TransferState.BOOTSTRAPPING
    error: str | None = None
    landed: list[bool] = field(default_factory=list)
    pieces_landed: int = 0
    next_piece_index: int = 0
    owner: object | None = None  # the connection feeding it; others are refused
    released: bool = False
    write_lock: threading.Lock = field(default_factory=threading.Lock)
    last_write: torch.cuda.Stream | None = None  # the GPU stream its scatters were issued on


@dataclass(frozen=True)
class PieceTicket:
    """An accepted header and the staging tensor its bytes are received into."""

    handle_id: str
    header: kv_transfer_pb2.TransferHeader
    positions: range  # indices into the reservation's block ids
    staging: torch.Tensor  # the piece, [n, num_layers, 2, block_size, heads, head_dim]
    deadline: float  # the reservation's: the bytes must arrive before it
    mover: BlockMover  # copies staging blocks into the destination blocks
    views: PieceViews  # the staging bytes: messages and block slabs
    shape: tuple[int, ...]
    stream: torch.cuda.Stream | None  # where the scatters are issued (a GPU cache only)


class ReservationTable:
    def __init__(self, kv_cache: torch.Tensor, address: str, receiver_id: str) -> None:
        self.kv_cache = kv_cache
        self.layout = KVLayout.of(kv_cache)
        self.num_blocks = kv_cache.shape[2]
        self.address = address
        self.receiver_id = receiver_id
        self._lock = threading.Lock()
        self._settled = threading.Condition(self._lock)  # notified when a reservation turns terminal
        self._reservations: dict[str, _Reservation] = {}
        self.max_payload_bytes = kv_cache.numel() * kv_cache.element_size()  # no piece is larger
        self.cache = CacheBlocks(kv_cache)  # what landings and in-place receives write into, seen once
        self._word = self.cache.words.dtype
        # Handle id -> the writer with receives posted straight into that reservation's blocks.
        self._cache_writers: dict[str, CacheWriter] = {}

    # ---------------------------------------------------------------------------- the worker's side

    def reserve(
        self,
        request_id: str,
        block_ids: Sequence[int],
        num_tokens: int,
        deadline: float,
        first_block_index: int = 0,
    ) -> TransferHandle:
        ids = check_block_ids(block_ids, self.num_blocks, f"reserve({request_id!r})")
        if num_tokens <= 0 or first_block_index < 0:
            raise ValueError(
                f"reserve({request_id!r}): num_tokens={num_tokens}, first_block_index={first_block_index}"
            )
        expected = self.layout.num_blocks_for(num_tokens) - first_block_index
        if len(ids) != expected or expected <= 0:
            raise ValueError(
                f"reserve({request_id!r}): {len(ids)} block ids given, {expected} needed for {num_tokens} tokens "
                f"of block size {self.layout.block_size} after {first_block_index} cached blocks"
            )
        handle = TransferHandle(
            request_id=request_id,
            handle_id=uuid.uuid4().hex,
            receiver_id=self.receiver_id,
            address=self.address,
            block_ids=ids,
            num_tokens=num_tokens,
            layout=self.layout,
            deadline=deadline,
            first_block_index=first_block_index,
        )
        with self._lock:
            self._reservations[handle.handle_id] = _Reservation(handle, landed=[False] * len(ids))
        return handle

    def poll(self, handle: TransferHandle) -> TransferState:
        with self._lock:
            reservation = self._get(handle.handle_id)
            self._expire(reservation)
            return reservation.state

    def error(self, handle: TransferHandle) -> str | None:
        with self._lock:
            reservation = self._get(handle.handle_id)
            self._expire(reservation)
            return reservation.error

    def wait(self, handle: TransferHandle, timeout: float) -> TransferState:
        """Block until the reservation is terminal or ``timeout`` seconds passed; the state then."""
        end = time.monotonic() + timeout
        with self._settled:
            while True:
                reservation = self._get(handle.handle_id)
                self._expire(reservation)
                left = min(end - time.monotonic(), handle.remaining())
                if reservation.state.is_terminal or end <= time.monotonic():
                    return reservation.state
                self._settled.wait(max(left, 1e-4))

    def release(self, handle: TransferHandle) -> None:
        with self._lock:
            reservation = self._reservations.pop(handle.handle_id, None)
        if reservation is not None:
            with reservation.write_lock:  # waits for a scatter being issued, if any
                reservation.released = True
                if reservation.last_write is not None:  # and for the scatters already on the GPU
                    reservation.last_write.synchronize()
        self._await_cache_writes(handle)

    def _await_cache_writes(self, handle: TransferHandle) -> None:
        """Return once no receive posted into the reserved blocks can write any more.

        They complete, or after ``RELEASE_WAIT_S`` their writer is cut off and we wait for its link to
        be torn down (``writer_gone``); its receives wait no longer than the reservation's deadline.
        """
        handle_id = handle.handle_id
        with self._settled:
            if self._settled.wait_for(lambda: handle_id not in self._cache_writers, RELEASE_WAIT_S):
                return
            writer = self._cache_writers[handle_id]
        writer.abort(f"transfer {handle_id} released while its KV was still arriving")
        limit = max(handle.deadline - time.time(), 0.0) + CUT_OFF_MARGIN_S
        with self._settled:
            if not self._settled.wait_for(lambda: handle_id not in self._cache_writers, limit):
                log.error("transfer %s: receives into released blocks still pending after %.0f s", handle_id, limit)

    def __len__(self) -> int:
        with self._lock:
            return len(self._reservations)

    # ----------------------------------------------------------------------------- the wire's side

    def accept_header(
        self,
        header: kv_transfer_pb2.TransferHeader,
        owner: object,
        views: PieceViews | None = None,
        stream: torch.cuda.Stream | None = None,
    ) -> PieceTicket:
        """Validate a descriptor; raises TransferError (and fails the reservation) when it is wrong.

        ``views``: the staging bytes the piece is (being) received into, if the transport cut them
        before validation; else a buffer is allocated here. ``stream``: where the caller will issue
        the scatters (default: the current stream, on a GPU).
        """
        with self._lock:
            reservation = self._reservations.get(header.handle_id)
            if reservation is None:
                raise TransferError("NOT_FOUND", f"unknown or released transfer handle {header.handle_id!r}")
            try:
                positions = self._check_header(reservation, header, owner)
            except TransferError as exc:
                if exc.code != "NOT_FOUND" and not reservation.state.is_terminal:
                    self._fail(reservation, f"rejected piece {header.piece_index}: {exc}")
                raise
            reservation.owner = owner
            reservation.next_piece_index += 1
            if reservation.state is TransferState.BOOTSTRAPPING:
                reservation.state = TransferState.TRANSFERRING
        device, shape = self.kv_cache.device, tuple(header.shape)
        if views is None:
            views = Staging(device).views(header.payload_bytes, header.message_bytes, header.num_messages)
        if stream is None and device.type == "cuda":
            stream = torch.cuda.current_stream(device)
        staging = views.piece(shape, self.layout.torch_dtype)  # validated: exactly this shape's bytes
        mover = BlockMover(header.block_ids, device)
        deadline = reservation.handle.deadline
        return PieceTicket(
            header.handle_id, header, positions, staging, deadline, mover, views, shape, stream
        )

    def cache_targets(self, ticket: PieceTicket) -> list[torch.Tensor | None]:
        """Per message of the piece, the cache's own bytes it can be received into, else None.

        Only on a block-major cache, for pieces without a checksum (a checksummed piece lands only once
        verified) framed in whole blocks, and for messages whose blocks are consecutive in the cache.
        """
        header, one_block = ticket.header, self.layout.block_bytes
        if (
            self.cache.rows is None
            or header.checksum_algorithm != Checksum.CHECKSUM_ALGORITHM_NONE
            or header.message_bytes % one_block
        ):
            return [None] * header.num_messages
        plan = message_blocks(header.payload_bytes, header.message_bytes, one_block, len(ticket.positions))
        return [ticket.mover.direct(self.cache, lo, hi) for lo, hi in plan]

    def begin_cache_writes(self, ticket: PieceTicket, writer: CacheWriter) -> bool:
        """Register ``writer`` before it posts receives into the ticket's blocks; False (post none
        there) once the reservation was released. ``release`` waits for them until
        ``end_cache_writes`` (or ``writer_gone``)."""
        with self._lock:
            reservation = self._reservations.get(ticket.handle_id)
        if reservation is None:
            return False
        with reservation.write_lock:
            if reservation.released:
                return False
            with self._lock:
                self._cache_writers[ticket.handle_id] = writer
        return True

    def end_cache_writes(self, handle_id: str) -> None:
        """Every receive posted into the blocks of ``handle_id`` completed."""
        with self._settled:
            self._cache_writers.pop(handle_id, None)
            self._settled.notify_all()

    def writer_gone(self, writer: CacheWriter) -> None:
        """``writer``'s link was torn down: none of its receives writes any more."""
        with self._settled:
            for handle_id in [h for h, w in self._cache_writers.items() if w is writer]:
                del self._cache_writers[handle_id]
            self._settled.notify_all()

    def land(self, ticket: PieceTicket) -> None:
        """Verify the received bytes and scatter the whole piece into the reserved blocks."""
        header = ticket.header
        self._live(ticket)
        if header.checksum_algorithm != Checksum.CHECKSUM_ALGORITHM_NONE:
            if checksum(header.checksum_algorithm, ticket.views.flat) != header.checksum:
                self.fail(ticket.handle_id, f"checksum mismatch in piece {header.piece_index}")
                raise TransferError("TRANSFER_FAILED", f"checksum mismatch in piece {header.piece_index}")
        self.land_blocks(ticket, 0, len(ticket.positions))
        self.complete_piece(ticket)

    def land_blocks(self, ticket: PieceTicket, lo: int, hi: int) -> None:
        """Copy piece blocks ``[lo, hi)`` of the staging tensor into their reserved blocks.

        On a GPU the copy is issued on the ticket's stream (which must be the current one) and not
        waited for; ``complete_piece`` (or ``release``) waits. Only for pieces without a checksum may
        blocks land before the whole piece arrived: a piece that then fails leaves some reserved
        blocks written, and the reservation FAILED (its blocks are the caller's to free, never read as
        valid KV).
        """
        reservation = self._live(ticket)
        slab = ticket.views.slab(ticket.shape, self.layout.torch_dtype, self._word, lo, hi)
        with reservation.write_lock:
            if reservation.released:
                raise TransferError(
                    "NOT_FOUND", f"transfer handle {ticket.handle_id!r} was released mid-transfer"
                )
            ticket.mover.scatter(self.cache.words, slab, lo, hi)
            if ticket.stream is not None:
                reservation.last_write = ticket.stream

    def complete_piece(self, ticket: PieceTicket) -> None:
        """Wait for the piece's scatters, then count its blocks as landed."""
        reservation = self._live(ticket)
        with reservation.write_lock:
            if reservation.released:
                raise TransferError(
                    "NOT_FOUND", f"transfer handle {ticket.handle_id!r} was released mid-transfer"
                )
            if reservation.last_write is not None:  # SUCCESS must mean the bytes are in place for any stream
                reservation.last_write.synchronize()
        with self._lock:
            for position in ticket.positions:
                reservation.landed[position] = True
            reservation.pieces_landed += 1

    def _live(self, ticket: PieceTicket) -> _Reservation:
        with self._lock:
            reservation = self._reservations.get(ticket.handle_id)
        if reservation is None:
            raise TransferError(
                "NOT_FOUND", f"transfer handle {ticket.handle_id!r} was released mid-transfer"
            )
        return reservation

    def finish(self, done: kv_transfer_pb2.TransferDone, owner: object) -> None:
        """The done marker: SUCCESS when every reserved block landed, else FAILED."""
        with self._lock:
            reservation = self._reservations.get(done.handle_id)
            if reservation is None:
                raise TransferError("NOT_FOUND", f"unknown or released transfer handle {done.handle_id!r}")
            self._expire(reservation)
            if reservation.state is TransferState.FAILED:
                raise TransferError("TRANSFER_FAILED", reservation.error or "transfer failed")
            problem = None
            if done.request_id != reservation.handle.request_id:
                problem = f"request id {done.request_id!r} does not match the reservation's {reservation.handle.request_id!r}"
            elif reservation.owner is not None and reservation.owner is not owner:
                problem = "done marker from a connection other than the one that sent the pieces"
            elif done.num_pieces != reservation.pieces_landed:
                problem = f"sender sent {done.num_pieces} pieces, {reservation.pieces_landed} landed"
            elif not all(reservation.landed):
                missing = [
                    reservation.handle.block_ids[i] for i, ok in enumerate(reservation.landed) if not ok
                ]
                problem = f"{len(missing)} reserved blocks never arrived (first: {missing[:8]})"
            if problem is not None:
                self._fail(reservation, problem)
                raise TransferError("INVALID_ARGUMENT", problem)
            reservation.state = TransferState.SUCCESS
            self._settled.notify_all()

    def fail(self, handle_id: str, message: str) -> None:
        with self._lock:
            reservation = self._reservations.get(handle_id)
            if reservation is not None and not reservation.state.is_terminal:
                self._fail(reservation, message)

    def fail_all(self, message: str) -> None:
        """The receiver shuts down: every unfinished transfer fails."""
        with self._lock:
            for reservation in self._reservations.values():
                if not reservation.state.is_terminal:
                    self._fail(reservation, message)

    def fail_owner(self, owner: object, message: str) -> None:
        """A connection died: every unfinished transfer it was feeding fails."""
        with self._lock:
            for reservation in self._reservations.values():
                if reservation.owner is owner and not reservation.state.is_terminal:
                    self._fail(reservation, message)

    # ------------------------------------------------------------------------------------- helpers

    def _get(self, handle_id: str) -> _Reservation:
        reservation = self._reservations.get(handle_id)
        if reservation is None:
            raise KeyError(f"unknown or released transfer handle {handle_id!r}")
        return reservation

    def _fail(self, reservation: _Reservation, message: str) -> None:
        reservation.state = TransferState.FAILED
        reservation.error = message
        self._settled.notify_all()

    def _expire(self, reservation: _Reservation) -> None:
        if not reservation.state.is_terminal and time.time() > reservation.handle.deadline:
            self._fail(reservation, "deadline exceeded before every block arrived")

    def _check_header(
        self, reservation: _Reservation, header: kv_transfer_pb2.TransferHeader, owner: object
    ) -> range:
        handle, layout = reservation.handle, self.layout
        self._expire(reservation)
        if reservation.state is TransferState.FAILED:
            raise TransferError("TRANSFER_FAILED", f"transfer already failed: {reservation.error}")
        if reservation.state is TransferState.SUCCESS:
            raise TransferError("INVALID_ARGUMENT", "transfer already complete")
        if header.request_id != handle.request_id:
            raise TransferError(
                "INVALID_ARGUMENT",
                f"request id {header.request_id!r} does not match the reservation's {handle.request_id!r}",
            )
        if reservation.owner is not None and reservation.owner is not owner:
            raise TransferError("INVALID_ARGUMENT", "another connection is already sending this transfer")
        if header.piece_index != reservation.next_piece_index:
            raise TransferError(
                "INVALID_ARGUMENT",
                f"piece {header.piece_index} out of order, expected {reservation.next_piece_index}",
            )
        if header.num_layers != layout.num_layers:
            raise TransferError(
                "INVALID_ARGUMENT", f"{header.num_layers} layers sent, cache has {layout.num_layers}"
            )
        if header.dtype != layout.dtype:
            raise TransferError(
                "INVALID_ARGUMENT", f"dtype {header.dtype!r} sent, cache holds {layout.dtype!r}"
            )
        count, offset = len(header.block_ids), header.dst_block_offset
        if count == 0:
            raise TransferError("INVALID_ARGUMENT", "a piece must carry at least one block")
        bad = [b for b in header.block_ids if not 0 <= b < self.num_blocks]
        if bad:
            raise TransferError(
                "INVALID_ARGUMENT", f"block ids {bad[:8]} out of range [0, {self.num_blocks})"
            )
        if offset < 0 or offset + count > len(handle.block_ids):
            raise TransferError(
                "INVALID_ARGUMENT",
                f"blocks [{offset}, {offset + count}) exceed the {len(handle.block_ids)} reserved",
            )
        if tuple(header.block_ids) != handle.block_ids[offset : offset + count]:
            raise TransferError(
                "INVALID_ARGUMENT", f"block ids at offset {offset} differ from the reserved ones"
            )
        positions = range(offset, offset + count)
        if any(reservation.landed[p] for p in positions):
            raise TransferError("INVALID_ARGUMENT", f"blocks at offset {offset} were already sent")
        if tuple(header.shape) != layout.piece_shape(count):
            raise TransferError(
                "INVALID_ARGUMENT",
                f"shape {list(header.shape)} does not match {list(layout.piece_shape(count))}",
            )
        if header.payload_bytes != count * layout.block_bytes:
            raise TransferError(
                "INVALID_ARGUMENT",
                f"payload of {header.payload_bytes} bytes, expected {count * layout.block_bytes}",
            )
        if header.message_bytes <= 0 or header.num_messages != math.ceil(
            header.payload_bytes / header.message_bytes
        ):
            raise TransferError(
                "INVALID_ARGUMENT",
                f"{header.num_messages} messages of {header.message_bytes} bytes cannot carry {header.payload_bytes}",
            )
        if _CHECKSUM_SIZES.get(header.checksum_algorithm, -1) != len(header.checksum):
            raise TransferError("INVALID_ARGUMENT", "unknown checksum algorithm or malformed checksum")
        return positions
