"""Sender over ``torch.distributed`` point-to-point (gloo or nccl), one group per receiver.

``send`` gathers the piece on the caller's thread (so the caller may reuse the source blocks at once)
and queues it for the receiver's link thread, which connects lazily (authenticate, build the pair's
group), then moves pieces one at a time: header -> ready ack -> raw messages -> landed ack. A link
that fails is torn down; the next piece for that receiver opens a fresh one.
"""

from __future__ import annotations

import contextlib
import datetime
import queue
import socket
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from baton.v1 import kv_transfer_pb2
from kv_transfer.base import (
    KVSender,
    TransferError,
    TransferHandle,
    TransferState,
    check_piece,
    gather_blocks,
)
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
from kv_transfer.wire import (
    CHECKSUMS,
    PeerGone,
    as_secret,
    build_header,
    client_handshake,
    expect,
    message_views,
    recv_message,
    send_message,
)

Message = kv_transfer_pb2.ControlMessage
LINK_ERRORS = (PeerGone, TimeoutError, OSError, RuntimeError, ValueError, KeyError)


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
        """Raises TransferError when the receiver rejects the descriptor (the link stays usable)."""
        send_message(self.sock, Message(transfer_header=header), deadline)
        expect(recv_message(self.sock, deadline), "ack")

    def post_messages(self, views: Sequence[torch.Tensor]) -> list[dist.Work]:
        return [self.group.send([view], RECEIVER_RANK, tag) for tag, view in enumerate(views)]

    def send_payload(
        self, header: kv_transfer_pb2.TransferHeader, piece: torch.Tensor, deadline: float
    ) -> None:
        """The raw messages of an accepted piece, then the receiver's landed ack."""
        wait_works(self.post_messages(message_views(piece, header)), self.backend, deadline, self.sock)
        expect(recv_message(self.sock, deadline), "ack")

    def send_piece(
        self, header: kv_transfer_pb2.TransferHeader, piece: torch.Tensor, deadline: float
    ) -> None:
        self.send_header(header, deadline)
        self.send_payload(header, piece, deadline)

    def send_done(self, done: kv_transfer_pb2.TransferDone, deadline: float) -> None:
        send_message(self.sock, Message(transfer_done=done), deadline)
        expect(recv_message(self.sock, deadline), "ack")

    def close(self, reason: str = "sender closing") -> None:
        with contextlib.suppress(Exception):
            send_message(
                self.sock, Message(goodbye=kv_transfer_pb2.Goodbye(reason=reason)), time.time() + 0.5
            )
        teardown_group(self.group)
        with contextlib.suppress(OSError):
            self.sock.close()


@dataclass
class _Outgoing:
    handle: TransferHandle
    state: TransferState = TransferState.BOOTSTRAPPING
    error: str | None = None
    pieces_queued: int = 0
    pieces_acked: int = 0
    got_last: bool = False


@dataclass
class _Job:
    outgoing: _Outgoing
    dst_block_offset: int
    piece: torch.Tensor | None  # None for a bare done marker
    piece_index: int
    last: bool
    ready: torch.cuda.Event | None = field(default=None)


class DistKVSender(KVSender):
    def __init__(
        self,
        *,
        backend: str,
        device: torch.device | str,
        secret: bytes | str,
        sender_id: str = "",
        host: str = "127.0.0.1",
        max_message_bytes: int = 64 << 20,
        checksum: str = "none",
        group_timeout: float = 60.0,
    ) -> None:
        if max_message_bytes <= 0:
            raise ValueError("max_message_bytes must be positive")
        self._backend = Backend(backend, torch.device(device))
        self._secret = as_secret(secret)
        self.sender_id = sender_id or f"prefill-{uuid.uuid4().hex[:8]}"
        self._host = host
        self._max_message_bytes = max_message_bytes
        self._checksum = CHECKSUMS[checksum]
        self._group_timeout = group_timeout
        self._lock = threading.Lock()
        self._transfers: dict[str, _Outgoing] = {}
        self._links: dict[str, _Link] = {}
        self._closed = False

    def send(self, handle, src_block_ids, kv_cache, *, dst_block_offset=0, last=True) -> None:
        src = check_piece(handle, src_block_ids, kv_cache, dst_block_offset)
        if kv_cache.device != self._backend.device:
            raise ValueError(f"kv_cache is on {kv_cache.device}, this sender moves {self._backend.device}")
        with self._lock:
            if self._closed:
                raise RuntimeError("sender is closed")
            outgoing = self._transfers.setdefault(handle.handle_id, _Outgoing(handle))
            if outgoing.got_last:
                raise ValueError(f"transfer {handle.handle_id} already got its last piece")
            if not src and not last:
                raise ValueError("a piece without blocks must be the last (a bare done marker)")
            outgoing.got_last = last
            piece_index = outgoing.pieces_queued
            outgoing.pieces_queued += 1 if src else 0
            link = self._links.get(handle.address)
            if link is None:
                link = self._links[handle.address] = _Link(self, handle.address)
        piece, ready = None, None
        if src:
            piece = gather_blocks(kv_cache, src)
            if piece.is_cuda:  # the link thread runs on its own stream; order it after the gather
                ready = torch.cuda.Event()
                ready.record()
        link.jobs.put(_Job(outgoing, dst_block_offset, piece, piece_index, last, ready))

    def poll(self, handle: TransferHandle) -> TransferState:
        with self._lock:
            outgoing = self._get(handle)
            if not outgoing.state.is_terminal and handle.remaining() < 0:
                outgoing.state, outgoing.error = TransferState.FAILED, "deadline exceeded"
            return outgoing.state

    def error(self, handle: TransferHandle) -> str | None:
        self.poll(handle)
        with self._lock:
            return self._get(handle).error

    def release(self, handle: TransferHandle) -> None:
        with self._lock:
            outgoing = self._transfers.pop(handle.handle_id, None)
            if outgoing is not None and not outgoing.state.is_terminal:
                outgoing.state, outgoing.error = TransferState.FAILED, "released by the sender"

    def close(self) -> None:
        with self._lock:
            self._closed = True
            links = list(self._links.values())
            self._links.clear()
            for outgoing in self._transfers.values():
                if not outgoing.state.is_terminal:
                    outgoing.state, outgoing.error = TransferState.FAILED, "sender closed"
        for link in links:
            link.stop()

    def _get(self, handle: TransferHandle) -> _Outgoing:
        outgoing = self._transfers.get(handle.handle_id)
        if outgoing is None:
            raise KeyError(f"unknown transfer handle {handle.handle_id!r}")
        return outgoing

    def _settle(self, outgoing: _Outgoing, state: TransferState, error: str | None = None) -> None:
        with self._lock:
            if not outgoing.state.is_terminal:
                outgoing.state, outgoing.error = state, error


class _Link:
    """Moves the queued pieces of every transfer bound for one receiver address, in order."""

    def __init__(self, sender: DistKVSender, address: str) -> None:
        self.sender = sender
        self.address = address
        self.jobs: queue.Queue[_Job | None] = queue.Queue()
        self.connection: SenderConnection | None = None
        self.active: list[_Outgoing] = []  # unfinished transfers with pieces sent over the connection
        self.thread = threading.Thread(target=self._run, name=f"kv-send-{address}", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.jobs.put(None)
        self.thread.join(timeout=2.0)

    def _run(self) -> None:
        sender = self.sender
        sender._backend.activate()
        while (job := self.jobs.get()) is not None:
            outgoing = job.outgoing
            if outgoing.state.is_terminal:
                continue  # an earlier piece failed; later pieces are dropped
            deadline = outgoing.handle.deadline
            try:
                if time.time() > deadline:
                    raise TimeoutError("deadline exceeded before the piece could be sent")
                self._run_job(job, deadline)
            except TransferError as exc:  # rejected by the receiver; the link stays usable
                sender._settle(outgoing, TransferState.FAILED, str(exc))
                self._forget(outgoing)
            except LINK_ERRORS as exc:
                sender._settle(outgoing, TransferState.FAILED, f"link to {self.address} failed: {exc}")
                self._drop_connection(f"link failed: {exc}")
        self._drop_connection("sender closed")

    def _run_job(self, job: _Job, deadline: float) -> None:
        sender, outgoing = self.sender, job.outgoing
        if self.connection is None:
            self.connection = SenderConnection.open(
                self.address,
                backend=sender._backend,
                secret=sender._secret,
                sender_id=sender.sender_id,
                local_host=sender._host,
                deadline=deadline,
                group_timeout=sender._group_timeout,
            )
        if job.piece is not None:
            if job.ready is not None:
                torch.cuda.current_stream().wait_event(job.ready)
            header = build_header(
                outgoing.handle,
                job.dst_block_offset,
                job.piece,
                job.piece_index,
                sender._max_message_bytes,
                sender._checksum,
            )
            self.connection.send_header(header, deadline)
            if outgoing not in self.active:
                self.active.append(outgoing)
            with sender._lock:
                if outgoing.state is TransferState.BOOTSTRAPPING:
                    outgoing.state = TransferState.TRANSFERRING
            self.connection.send_payload(header, job.piece, deadline)
            outgoing.pieces_acked += 1
        if job.last:
            done = kv_transfer_pb2.TransferDone(
                request_id=outgoing.handle.request_id,
                handle_id=outgoing.handle.handle_id,
                num_pieces=outgoing.pieces_acked,
            )
            self.connection.send_done(done, deadline)
            sender._settle(outgoing, TransferState.SUCCESS)
            self._forget(outgoing)

    def _forget(self, outgoing: _Outgoing) -> None:
        with contextlib.suppress(ValueError):
            self.active.remove(outgoing)

    def _drop_connection(self, reason: str) -> None:
        if self.connection is not None:
            self.connection.close(reason)
            self.connection = None
        # The receiver fails every unfinished transfer fed by a lost connection; mirror that here.
        for outgoing in self.active:
            self.sender._settle(outgoing, TransferState.FAILED, f"link to {self.address} lost: {reason}")
        self.active.clear()
