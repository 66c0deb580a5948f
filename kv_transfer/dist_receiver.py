"""Receiver over ``torch.distributed`` point-to-point (gloo or nccl), one group per sender.

Threads: one accepts control connections on ``host:port``; each connection gets its own thread (and,
on a GPU, its own stream) that authenticates the peer, builds the pair's process group on request, and
serves pieces one at a time (wire protocol: kv_transfer/wire.py).

A piece's first message is received into a staging buffer taken from the receiver's pool (reused and
grown on demand, its views cut once per piece size; see kv_transfer/staging.py), posted as soon as the
header's framing is sane, before anything else. The header is validated while it arrives; only then
are the other receives posted, straight into the reserved blocks where the cache is block-major and
a message's blocks are consecutive there, else into staging. Without a checksum, the blocks each
staged message completes are landed while the next message is in flight; with one, the whole piece
is staged, verified, then landed. A landing copy reads only staging bytes a message of this piece was
seen to fill; a piece that fails mid-way fails its reservation (whose blocks may then hold part of
it). A release waits for receives into its blocks, and cuts the sender off if they do not finish.
"""

from __future__ import annotations

import contextlib
import datetime
import secrets
import socket
import threading
import time
import uuid
from collections.abc import Sequence

import torch
import torch.distributed as dist

from baton.v1 import kv_transfer_pb2
from kv_transfer import diag
from kv_transfer.base import KVReceiver, TransferError, TransferHandle, TransferState
from kv_transfer.pair import (
    RECEIVER_RANK,
    SENDER_RANK,
    Backend,
    exchange_probe,
    make_group,
    teardown_group,
    wait_works,
)
from kv_transfer.reservations import PieceTicket, ReservationTable
from kv_transfer.staging import PieceViews, StagingPool, landings
from kv_transfer.wire import (
    Checksum,
    PeerGone,
    as_secret,
    error_to_proto,
    framing_problem,
    recv_message,
    send_message,
    server_handshake,
)

Message = kv_transfer_pb2.ControlMessage


class DistKVReceiver(KVReceiver):
    """Accepts KV from authenticated senders into ``kv_cache`` (which must live on ``device``).

    ``staging_buffers``: how many pieces (across all senders) are received at once into reused
    buffers; more at once get a one-off buffer each. ``receive_in_place``: receive messages straight
    into the reserved blocks where the cache allows; by default only over NCCL, where a sender that
    stalls mid-piece is cut off within milliseconds of a release (a gloo receive waits out its
    deadline, and so would that release).
    """

    def __init__(
        self,
        kv_cache: torch.Tensor,
        *,
        backend: str,
        secret: bytes | str,
        host: str = "127.0.0.1",
        port: int = 0,
        receiver_id: str = "",
        handshake_timeout: float = 5.0,
        group_timeout: float = 60.0,
        max_connections: int = 256,
        staging_buffers: int = 4,
        receive_in_place: bool | None = None,
    ) -> None:
        self._backend = Backend(backend, kv_cache.device)
        self._receive_in_place = backend == "nccl" if receive_in_place is None else receive_in_place
        self._secret = as_secret(secret)
        self._host = host
        self._handshake_timeout = handshake_timeout
        self._group_timeout = group_timeout
        self._max_connections = max_connections
        self.receiver_id = receiver_id or f"decode-{uuid.uuid4().hex[:8]}"
        self._store = dist.TCPStore(
            host, 0, None, True, datetime.timedelta(seconds=group_timeout), wait_for_workers=False
        )
        self._listener = socket.create_server((host, port))
        bound_port = self._listener.getsockname()[1]
        self._table = ReservationTable(kv_cache, f"{host}:{bound_port}", self.receiver_id)
        self._staging = StagingPool(kv_cache.device, size=staging_buffers)  # pieces received at once
        self._lock = threading.Lock()
        self._connections: set[_Connection] = set()
        self._closed = threading.Event()
        self._acceptor = threading.Thread(
            target=self._accept_loop, name=f"kv-accept-{bound_port}", daemon=True
        )
        self._acceptor.start()

    @property
    def address(self) -> str:
        return self._table.address

    @property
    def store_address(self) -> str:
        return f"{self._host}:{self._store.port}"

    @property
    def num_reservations(self) -> int:
        return len(self._table)

    def reserve(
        self,
        request_id: str,
        block_ids_dst: Sequence[int],
        num_tokens: int,
        deadline: float,
        *,
        first_block_index: int = 0,
    ) -> TransferHandle:
        return self._table.reserve(request_id, block_ids_dst, num_tokens, deadline, first_block_index)

    def poll(self, handle: TransferHandle) -> TransferState:
        return self._table.poll(handle)

    def wait(self, handle: TransferHandle, timeout: float) -> TransferState:
        """Block until the transfer is terminal or ``timeout`` seconds passed; the state then."""
        return self._table.wait(handle, timeout)

    def error(self, handle: TransferHandle) -> str | None:
        return self._table.error(handle)

    def release(self, handle: TransferHandle) -> None:
        self._table.release(handle)

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept(); close() alone does not
        with contextlib.suppress(OSError):
            self._listener.close()
        with self._lock:
            connections = list(self._connections)
        for connection in connections:
            connection.shutdown()
        for connection in connections:
            connection.thread.join(timeout=2.0)
        self._acceptor.join(timeout=2.0)
        self._table.fail_all("receiver closed")

    # ------------------------------------------------------------------------------------ internals

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return  # listener closed
            with self._lock:
                if len(self._connections) >= self._max_connections:
                    sock.close()
                    continue
                sock.setsockopt(
                    socket.IPPROTO_TCP, socket.TCP_NODELAY, 1
                )  # small control frames, no batching
                connection = _Connection(self, sock)
                self._connections.add(connection)
            connection.thread.start()

    def _forget(self, connection: _Connection) -> None:
        with self._lock:
            self._connections.discard(connection)


class _Connection:
    """One authenticated sender: its control socket, its process group, and the thread serving it."""

    def __init__(self, receiver: DistKVReceiver, sock: socket.socket) -> None:
        self.receiver = receiver
        self.sock = sock
        self.group: dist.ProcessGroup | None = None
        self.sender_id = "?"
        self.stream: torch.cuda.Stream | None = None  # this connection's scatters, on a GPU
        self.thread = threading.Thread(target=self._run, name="kv-recv-conn", daemon=True)

    def shutdown(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    def _run(self) -> None:
        receiver, reason = self.receiver, "connection closed"
        try:
            receiver._backend.activate()
            device = receiver._backend.device
            # Our own stream: scatters wait for this connection's messages, not for other work.
            stream = self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
            deadline = time.time() + receiver._handshake_timeout
            self.sender_id = server_handshake(self.sock, receiver._secret, receiver.receiver_id, deadline)
            with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                while not receiver._closed.is_set():
                    if not self._serve(recv_message(self.sock, deadline=None)):
                        break
        except (TransferError, PeerGone, TimeoutError, OSError, RuntimeError) as exc:
            reason = f"connection to sender {self.sender_id!r} lost: {exc}"
        finally:
            receiver._table.fail_owner(self, reason)
            teardown_group(self.group)
            receiver._table.writer_gone(self)  # its receives into reserved blocks were aborted
            with contextlib.suppress(OSError):
                self.sock.close()
            receiver._forget(self)

    def _serve(self, message: kv_transfer_pb2.ControlMessage) -> bool:
        """Handle one control message; False ends the connection."""
        kind = message.WhichOneof("kind")
        if kind == "pair_setup_request":
            try:
                self._setup_pair(message.pair_setup_request)
            except TransferError as exc:
                self._nack("", 0, exc)
                raise
        elif kind == "transfer_header":
            self._receive_piece(message.transfer_header)
        elif kind == "transfer_done":
            done = message.transfer_done
            try:
                self.receiver._table.finish(done, owner=self)
            except TransferError as exc:
                self._nack(done.handle_id, 0, exc)
            else:
                self._reply(Message(ack=kv_transfer_pb2.Ack(handle_id=done.handle_id)))
        elif kind == "goodbye":
            return False
        else:
            raise TransferError("INVALID_ARGUMENT", f"unexpected control message {kind!r}")
        return True

    def _setup_pair(self, request: kv_transfer_pb2.PairSetupRequest) -> None:
        receiver = self.receiver
        if self.group is not None:
            raise TransferError("INVALID_ARGUMENT", "pair already set up on this connection")
        if request.backend != receiver._backend.name:
            raise TransferError(
                "INVALID_ARGUMENT", f"sender uses {request.backend!r}, receiver {receiver._backend.name!r}"
            )
        prefix = f"baton-kv/{secrets.token_hex(16)}/"
        response = kv_transfer_pb2.PairSetupResponse(
            store_address=receiver.store_address,
            group_prefix=prefix,
            sender_rank=SENDER_RANK,
            receiver_rank=RECEIVER_RANK,
            timeout_ms=int(receiver._group_timeout * 1000),
        )
        self._reply(Message(pair_setup_response=response))
        deadline = time.time() + receiver._group_timeout
        self.group = make_group(
            receiver._backend, receiver._store, prefix, RECEIVER_RANK, receiver._host, receiver._group_timeout
        )
        exchange_probe(self.group, receiver._backend, RECEIVER_RANK, deadline, self.sock)

    def _receive_piece(self, header: kv_transfer_pb2.TransferHeader) -> None:
        """Receive one piece; exactly one answer (Ack or Nack) goes back once its messages are in.

        The sender posted the messages right behind the header, so the receives are posted first,
        into the staging buffer, as soon as the framing is sane; the header is validated against the
        reservation meanwhile, and nothing touches the cache before that passed.
        """
        table, receiver = self.receiver._table, self.receiver
        problem = None if self.group is not None else "transfer before pair setup"
        problem = problem or framing_problem(header, table.max_payload_bytes)
        if problem is not None:  # its messages cannot be matched: refuse it and drop the pair
            error = TransferError("INVALID_ARGUMENT", problem)
            table.fail(header.handle_id, f"rejected piece {header.piece_index}: {error}")
            self._nack(header.handle_id, header.piece_index, error)
            raise error
        staging = receiver._staging.acquire()
        try:
            # Bounded by framing_problem: a buffer never grows past the size of the whole cache.
            views = staging.views(header.payload_bytes, header.message_bytes, header.num_messages)
            self._serve_piece(header, views)
        except BaseException:
            receiver._staging.discard(staging)  # receives into it or scatters from it may be pending
            raise
        staging.give_back()  # every receive completed and every scatter finished: free for reuse

    def _serve_piece(self, header: kv_transfer_pb2.TransferHeader, views: PieceViews) -> None:
        """Post the receives, validate, land (or drain), answer; returns only once all of it is done.

        The first message's receive goes into staging at once; the header is validated while it
        arrives. Only then are the other receives posted: straight into the reserved blocks where the
        cache allows (``ReservationTable.cache_targets``), else into staging, whose blocks land as
        their messages complete.

        A TransferError here is the piece's refusal, answered with a Nack; any other exception leaves
        receives or scatters pending and ends the connection.
        """
        table, receiver = self.receiver._table, self.receiver
        t0 = time.perf_counter()
        works = self._post_receives(views.messages[:1], header)
        t1 = time.perf_counter()
        try:
            ticket = table.accept_header(header, owner=self, views=views, stream=self.stream)
        except TransferError as exc:
            self._nack(header.handle_id, header.piece_index, exc)
            # Drain: the refused bytes land in staging and are dropped, keeping the pair in step.
            works += self._post_receives(views.messages[1:], header, first_tag=1)
            self._wait(works, header, time.time() + receiver._group_timeout)
            return
        in_place = self._in_place_messages(ticket)
        buffers = [cache if cache is not None else staged for cache, staged in zip(in_place, views.messages, strict=True)]
        works += self._post_receives(buffers[1:], header, first_tag=1)
        try:
            if header.checksum_algorithm == Checksum.CHECKSUM_ALGORITHM_NONE:
                self._land_as_messages_arrive(ticket, works, in_place)
            else:
                self._wait(works, header, ticket.deadline)
                table.land(ticket)
            if header.last:  # the transfer is complete before the sender hears of this piece
                done = kv_transfer_pb2.TransferDone(
                    request_id=header.request_id, handle_id=header.handle_id, num_pieces=header.piece_index + 1
                )
                table.finish(done, owner=self)
                # Hand the GIL over now: the thread waiting on this transfer (a decode worker's loop)
                # runs before the ack below is built, not after (finish -> waiter 13-17 vs 18-30 us on CPU).
                time.sleep(0)
        except TransferError as exc:  # every message arrived, but the piece cannot land (or complete)
            self._nack(header.handle_id, header.piece_index, exc)
            return
        t2 = time.perf_counter()
        self._reply(
            Message(ack=kv_transfer_pb2.Ack(handle_id=header.handle_id, piece_index=header.piece_index))
        )
        if diag.ENABLED:
            diag.trace(
                "D", "piece", bytes=header.payload_bytes, post_ms=1e3 * (t1 - t0),
                arrive_land_ms=1e3 * (t2 - t1), ack_ms=1e3 * (time.perf_counter() - t2),
                in_place=sum(buffer is not None for buffer in in_place),
            )  # fmt: skip

    def _in_place_messages(self, ticket: PieceTicket) -> list[torch.Tensor | None]:
        """Per message, the reserved blocks' bytes to receive it into, or None for staging.

        The first message is always staged (its receive was posted before the header was checked).
        Registers this connection as writing into the reservation's blocks when any message is not.
        """
        table = self.receiver._table
        if not self.receiver._receive_in_place:
            return [None] * ticket.header.num_messages
        targets = [None, *table.cache_targets(ticket)[1:]]
        if any(target is not None for target in targets) and table.begin_cache_writes(ticket, self):
            return targets
        return [None] * len(targets)

    def abort(self, reason: str) -> None:
        """Cut this sender off (a released transfer's bytes are still arriving into its blocks).

        Its transfers fail now. The connection's thread sees its control socket shut on its next
        liveness check (NCCL: within milliseconds; gloo receives notice only at their deadline), tears
        the group down, which ends the receives, and then reports ``writer_gone``.
        """
        self.receiver._table.fail_owner(self, reason)
        self.shutdown()

    def _post_receives(
        self, buffers: Sequence[torch.Tensor], header: kv_transfer_pb2.TransferHeader, first_tag: int = 0
    ) -> list[dist.Work]:
        group = self.group
        return [group.recv([buffer], SENDER_RANK, tag) for tag, buffer in enumerate(buffers, first_tag)]

    def _wait(self, works: list[dist.Work], header: kv_transfer_pb2.TransferHeader, deadline: float) -> None:
        try:
            wait_works(works, self.receiver._backend, deadline, self.sock)
        except (TimeoutError, PeerGone, RuntimeError) as exc:
            self.receiver._table.fail(header.handle_id, f"piece {header.piece_index} did not arrive: {exc}")
            raise  # the group may hold unmatched operations: drop the connection and its group

    def _land_as_messages_arrive(
        self, ticket: PieceTicket, works: list[dist.Work], in_place: Sequence[torch.Tensor | None]
    ) -> None:
        """Land the blocks each staged message completes while the next ones arrive.

        Each landing copy is issued only once the host saw its message complete. (Queuing them all behind
        their receives in stream order saves ~75 us per 256 MiB piece on an H100 pair, but a sender
        that dies mid-piece would then let its partial bytes land once the pair is torn down, and a
        release would wait for the rest of the piece.) Messages received in place need no landing;
        once all of them are in, this connection stops counting as a writer into the blocks.

        A reservation released mid-piece stops the landings, but the rest of the messages are still
        received (staged ones into staging) so the pair stays in step; the piece is then refused.
        """
        table, header = self.receiver._table, ticket.header
        plan = landings(header.payload_bytes, header.message_bytes, table.layout.block_bytes, len(ticket.positions))
        refused = None
        for work, blocks, target in zip(works, plan, in_place, strict=True):
            self._wait([work], header, ticket.deadline)
            if blocks is not None and target is None and refused is None:
                try:
                    table.land_blocks(ticket, *blocks)
                except TransferError as exc:
                    refused = exc
        if any(target is not None for target in in_place):
            table.end_cache_writes(ticket.handle_id)
        if refused is not None:
            raise refused
        table.complete_piece(ticket)

    def _nack(self, handle_id: str, piece_index: int, error: TransferError) -> None:
        nack = kv_transfer_pb2.Nack(handle_id=handle_id, piece_index=piece_index, error=error_to_proto(error))
        self._reply(Message(nack=nack))

    def _reply(self, message: kv_transfer_pb2.ControlMessage) -> None:
        send_message(self.sock, message, time.time() + self.receiver._handshake_timeout)
