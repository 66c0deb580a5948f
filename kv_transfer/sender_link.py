"""One sender's link to one receiver address: its connection, its queue, the answers it is owed.

Posting (a header frame followed by its messages, or a done marker) happens under ``post_lock``, so
frames and NCCL operations keep one order on the pair, whoever posts: the caller's thread inside
``send`` when the connection is up and nothing is queued, else the link thread. Every posted piece
and done marker is owed exactly one answer, in posting order; the link thread reads them and settles
the transfers. A link that fails is torn down: every transfer it owes an answer to, or that has
pieces on it, fails (the receiver fails its side the same way); queued pieces open a fresh one.
``open_soon`` (``KVSender.warm_up``) has the link thread open the connection before any piece needs
it, so the first transfer finds the pair built.
"""

from __future__ import annotations

import collections
import contextlib
import datetime
import logging
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from baton.v1 import kv_transfer_pb2
from kv_transfer import diag
from kv_transfer.base import TransferError, TransferHandle, TransferState
from kv_transfer.pair import (
    RECEIVER_RANK,
    SENDER_RANK,
    Backend,
    exchange_probe,
    make_group,
    parse_address,
    teardown_group,
    wait_works,
)
from kv_transfer.staging import PieceViews, Staging
from kv_transfer.wire import PeerGone, client_handshake, expect, recv_message, send_message

if TYPE_CHECKING:
    from kv_transfer.dist_sender import DistKVSender

Message = kv_transfer_pb2.ControlMessage
log = logging.getLogger(__name__)
LINK_ERRORS = (PeerGone, TimeoutError, OSError, RuntimeError, ValueError, KeyError)
FRAME_TIMEOUT = 5.0  # seconds a control frame may take to enter the socket before the link is dead


class SenderConnection:
    """One authenticated control connection plus the pair's process group, as the sender (rank 0)."""

    def __init__(
        self, sock: socket.socket, group: dist.ProcessGroup, backend: Backend, receiver_id: str
    ) -> None:
        self.sock = sock
        self.group = group
        self.backend = backend
        self.receiver_id = receiver_id

    @classmethod
    def open(
        cls,
        address: str,
        *,
        backend: Backend,
        secret: bytes,
        sender_id: str,
        local_host: str,
        deadline: float,
        group_timeout: float,
    ) -> SenderConnection:
        host, port = parse_address(address)
        sock = socket.create_connection((host, port), timeout=max(deadline - time.time(), 1e-3))
        group = None
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            receiver_id = client_handshake(sock, secret, sender_id, deadline)
            request = kv_transfer_pb2.PairSetupRequest(backend=backend.name)
            send_message(sock, Message(pair_setup_request=request), deadline)
            setup = expect(recv_message(sock, deadline), "pair_setup_response")
            store_host, store_port = parse_address(setup.store_address)
            if setup.sender_rank != SENDER_RANK or setup.receiver_rank != RECEIVER_RANK:
                raise TransferError(
                    "INVALID_ARGUMENT", f"unexpected ranks {setup.sender_rank}/{setup.receiver_rank}"
                )
            timeout = max(min(group_timeout, deadline - time.time()), 1.0)
            store = dist.TCPStore(store_host, store_port, None, False, datetime.timedelta(seconds=timeout))
            group = make_group(backend, store, setup.group_prefix, SENDER_RANK, local_host, timeout)
            exchange_probe(group, backend, SENDER_RANK, deadline, sock)
        except BaseException:
            teardown_group(group)
            sock.close()
            raise
        return cls(sock, group, backend, receiver_id)

    def send_header(self, header: kv_transfer_pb2.TransferHeader, deadline: float) -> None:
        """A piece's descriptor; its messages follow at once (the answer comes after them)."""
        send_message(self.sock, Message(transfer_header=header), deadline)

    def post_messages(self, views: Sequence[torch.Tensor]) -> list[dist.Work]:
        """Post the sends of every message of a piece cut into ``views``, in order."""
        return [self.post_message(view, tag) for tag, view in enumerate(views)]

    def post_message(self, view: torch.Tensor, tag: int) -> dist.Work:
        """Post the send of message ``tag`` of a piece (on CUDA, after the current stream's work)."""
        return self.group.send([view], RECEIVER_RANK, tag)

    def send_done(self, done: kv_transfer_pb2.TransferDone, deadline: float) -> None:
        """The done marker; its answer follows the answers to every piece sent before it."""
        send_message(self.sock, Message(transfer_done=done), deadline)

    def read_ack(self, deadline: float) -> None:
        """The receiver's next answer; a Nack becomes a TransferError."""
        expect(recv_message(self.sock, deadline), "ack")

    def close(self, reason: str = "sender closing") -> None:
        with contextlib.suppress(Exception):
            send_message(
                self.sock, Message(goodbye=kv_transfer_pb2.Goodbye(reason=reason)), time.time() + 0.5
            )
        with contextlib.suppress(OSError):  # wakes a thread blocked reading an answer; close() may not
            self.sock.shutdown(socket.SHUT_RDWR)
        teardown_group(self.group)
        with contextlib.suppress(OSError):
            self.sock.close()


@dataclass
class Outgoing:
    """One transfer, as the sender sees it."""

    handle: TransferHandle
    state: TransferState = TransferState.BOOTSTRAPPING
    error: str | None = None
    pieces_queued: int = 0
    pieces_posted: int = 0
    got_last: bool = False
    reads_cache: bool = False  # some message was posted straight from the caller's cache


@dataclass
class Job:
    """A piece (or a bare done marker) on its way: gathered already when it waits in a link's queue."""

    outgoing: Outgoing
    dst_block_offset: int
    piece_index: int
    last: bool
    src: tuple[int, ...] = ()
    views: PieceViews | None = None  # a queued piece's own buffer, cut into messages
    message_bytes: int = 0
    gathered: torch.cuda.Event | None = None  # after the whole gather, on a GPU


@dataclass
class _Owed:
    """An answer the receiver owes: for a piece, or a done marker; ``done``: that answer settles the
    transfer (a done marker, or a piece sent as the last).

    A piece's ``works`` and ``views`` (its bytes) are kept until the answer came and its sends are seen
    complete; then its pooled ``staging`` buffer, if any, is free for the next piece.
    """

    outgoing: Outgoing
    done: bool
    works: list[dist.Work] = field(default_factory=list)
    views: PieceViews | None = None
    staging: Staging | None = None


class Link:
    """Everything bound for one receiver address, in order (see the module docstring)."""

    def __init__(self, sender: DistKVSender, address: str) -> None:
        self.sender = sender
        self.address = address
        self.connection: SenderConnection | None = None
        self.post_lock = threading.RLock()  # one poster at a time; held while the connection changes
        self._changed = threading.Condition()  # guards the three collections below and _stopped
        self._queued: collections.deque[Job] = collections.deque()
        self._owed: collections.deque[_Owed] = collections.deque()
        self._active_transfers: dict[int, Outgoing] = {}  # unfinished, with pieces on this connection
        self._open_wanted = False  # warm_up asked for the connection before any piece needs it
        self._stopped = False
        self.thread = threading.Thread(target=self._run, name=f"kv-send-{address}", daemon=True)
        self.thread.start()

    # ------------------------------------------------------------------------- the caller's side

    def submit(self, job: Job, kv_cache: torch.Tensor) -> None:
        """Post the job now if the link is up and idle; else gather it and queue it for the thread."""
        t0 = time.perf_counter()
        with self.post_lock:
            if diag.ENABLED:
                diag.trace(
                    "P", "submit", lock_wait_ms=1e3 * (time.perf_counter() - t0), queued=len(self._queued)
                )
            with self._changed:
                direct = self.connection is not None and not self._queued
            if direct:
                try:
                    t1 = time.perf_counter()
                    self._post(job, self.connection, kv_cache)
                    if diag.ENABLED:
                        diag.trace("P", "posted", post_ms=1e3 * (time.perf_counter() - t1), blocks=len(job.src))
                except LINK_ERRORS as exc:
                    self.sender.settle(
                        job.outgoing, TransferState.FAILED, f"link to {self.address} failed: {exc}"
                    )
                    self._drop_connection(f"posting failed: {exc}")
                return
            if job.src:
                self.sender.gather(job, kv_cache)
            with self._changed:
                self._queued.append(job)
                self._changed.notify_all()

    def open_soon(self) -> bool:
        """Have the link thread open the connection now (``KVSender.warm_up``); False if it is open
        or opening already."""
        with self._changed:
            if self.connection is not None or self._open_wanted:
                return False
            self._open_wanted = True
            self._changed.notify_all()
            return True

    def stop(self) -> None:
        with self._changed:
            self._stopped = True
            self._changed.notify_all()
        connection = self.connection
        if connection is not None:  # wakes the thread if it is blocked reading an answer
            with contextlib.suppress(OSError):
                connection.sock.shutdown(socket.SHUT_RDWR)
        self.thread.join(timeout=2.0)

    # --------------------------------------------------------------------------------- posting

    def _post(self, job: Job, connection: SenderConnection, kv_cache: torch.Tensor | None = None) -> None:
        """Post one job on ``connection`` and record the answers it is owed (``post_lock`` held).

        With ``kv_cache`` the piece is gathered while it is posted (the caller's thread); without,
        it was gathered when it was queued.
        """
        sender, outgoing = self.sender, job.outgoing
        if outgoing.state.is_terminal:
            return  # an earlier piece failed; later pieces are dropped
        if time.time() > outgoing.handle.deadline:
            sender.settle(outgoing, TransferState.FAILED, "deadline exceeded before the piece could be sent")
            return
        deadline = min(outgoing.handle.deadline, time.time() + FRAME_TIMEOUT)
        if job.src:
            # A last piece completes the transfer on arrival: its answer settles it (no done marker).
            if kv_cache is not None:
                works, staging, views = sender.post_piece(job, kv_cache, connection, deadline)
                owed = _Owed(outgoing, job.last, works, views, staging)
            else:
                works = sender.post_gathered(job, connection, deadline)
                owed = _Owed(outgoing, job.last, works, job.views)
            outgoing.pieces_posted += 1
            sender.mark_transferring(outgoing)
            self._owe(owed, active=True)
        elif job.last:  # a bare done marker: every piece went before
            done = kv_transfer_pb2.TransferDone(
                request_id=outgoing.handle.request_id,
                handle_id=outgoing.handle.handle_id,
                num_pieces=outgoing.pieces_posted,
            )
            connection.send_done(done, deadline)
            self._owe(_Owed(outgoing, True), active=False)

    def _owe(self, owed: _Owed, active: bool) -> None:
        with self._changed:
            self._owed.append(owed)
            if active:
                self._active_transfers[id(owed.outgoing)] = owed.outgoing
            self._changed.notify_all()

    def _post_queued(self) -> None:
        """Connect if needed, then post every queued job in order (the link thread)."""
        with self._changed:
            head = self._queued[0]
        connection = self.connection
        if connection is None:
            sender = self.sender
            try:
                connection = self._open(head.outgoing.handle.deadline)
            except (TransferError, *LINK_ERRORS) as exc:  # this job fails; the next one tries afresh
                with self._changed:
                    self._queued.popleft()
                sender.settle(head.outgoing, TransferState.FAILED, f"link to {self.address} failed: {exc}")
                return
        with self.post_lock:
            self.connection = connection
            while True:
                with self._changed:
                    if not self._queued:
                        return
                    job = self._queued.popleft()
                try:
                    self._post(job, connection)
                except LINK_ERRORS as exc:
                    self.sender.settle(
                        job.outgoing, TransferState.FAILED, f"link to {self.address} failed: {exc}"
                    )
                    raise

    def _open(self, deadline: float) -> SenderConnection:
        sender = self.sender
        return SenderConnection.open(
            self.address,
            backend=sender.backend,
            secret=sender.secret,
            sender_id=sender.sender_id,
            local_host=sender.host,
            deadline=deadline,
            group_timeout=sender.group_timeout,
        )

    def _open_ahead(self) -> None:
        """Open the connection before any piece needs it (the link thread); a failure is only logged:
        the first piece then opens it as it would have."""
        try:
            if self.connection is None:
                connection = self._open(time.time() + self.sender.group_timeout)
                with self.post_lock:
                    self.connection = connection
        except (TransferError, *LINK_ERRORS) as exc:
            log.info("KV link to %s not opened ahead: %s", self.address, exc)
        finally:
            with self._changed:
                self._open_wanted = False

    # ---------------------------------------------------------------------------------- answers

    def _read_answer(self) -> None:
        """Read the answer at the head of the owed queue and settle its transfer (the link thread)."""
        with self._changed:
            owed = self._owed[0]
        connection = self.connection
        if connection is None:
            return
        outgoing = owed.outgoing
        deadline = outgoing.handle.deadline
        refused = None
        t0 = time.perf_counter()
        try:
            connection.read_ack(deadline)
        except TransferError as exc:
            refused = exc
        if diag.ENABLED:
            diag.trace("P", "answer", wait_ms=1e3 * (time.perf_counter() - t0), owed=len(self._owed))
        # Answered pieces' messages were received (landed or drained): their sends are complete.
        wait_works(owed.works, self.sender.backend, deadline, connection.sock)
        if owed.staging is not None and owed.works:
            owed.staging.sends_completed(owed.works[-1])
        with self._changed:
            if not self._owed or self._owed[0] is not owed:
                return  # the connection was dropped meanwhile
            self._owed.popleft()
            self._changed.notify_all()  # for stop_reading
            finished = refused is not None or owed.done
            if finished:
                self._active_transfers.pop(id(outgoing), None)
        if refused is not None:
            self.sender.settle(outgoing, TransferState.FAILED, str(refused))
        elif owed.done:
            self.sender.settle(outgoing, TransferState.SUCCESS)

    def stop_reading(self, outgoing: Outgoing, timeout: float) -> None:
        """Return once no send of ``outgoing`` is in flight any more.

        A piece's sends are complete once its answer was read (the receiver answers only after every
        message arrived, landed or drained). If the answers do not come within ``timeout``, the
        connection is torn down, which aborts its sends (and fails the other transfers on it).
        """
        end = time.monotonic() + timeout
        with self._changed:
            while any(owed.outgoing is outgoing for owed in self._owed):
                left = end - time.monotonic()
                if left <= 0:
                    break
                self._changed.wait(left)
            else:
                return
        self._drop_connection("a released transfer's sends did not finish")

    # ------------------------------------------------------------------------------------ thread

    def _run(self) -> None:
        sender = self.sender
        sender.backend.activate()
        device = sender.backend.device
        # Our own stream: queued sends wait for their gather, never for the caller's later work.
        stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            while True:
                with self._changed:
                    while not (self._stopped or self._queued or self._owed or self._open_wanted):
                        self._changed.wait()
                    if self._stopped:
                        break
                    queued, opening = bool(self._queued), self._open_wanted
                try:
                    if opening:
                        self._open_ahead()
                    elif queued:
                        self._post_queued()
                    else:
                        self._read_answer()
                except LINK_ERRORS as exc:
                    self._drop_connection(f"link failed: {exc}")
        self._drop_connection("sender closed")

    def _drop_connection(self, reason: str) -> None:
        """Tear the connection down; every transfer owed an answer or with pieces on it fails.

        Staging buffers of pieces still owed an answer leave the pool: their sends were cut off and
        may never report completion.
        """
        with self.post_lock:
            connection, self.connection = self.connection, None
            if connection is not None:
                connection.close(reason)
            with self._changed:
                failed = [owed.outgoing for owed in self._owed] + list(self._active_transfers.values())
                for owed in self._owed:
                    if owed.staging is not None:
                        self.sender.discard_staging(owed.staging)
                self._owed.clear()
                self._active_transfers.clear()
                self._changed.notify_all()
        for outgoing in failed:
            self.sender.settle(outgoing, TransferState.FAILED, f"link to {self.address} lost: {reason}")
