"""In-process transport: a sender and receivers sharing one ``LoopbackHub`` (tests, single process).

It runs the same authentication, descriptor checks and landing code as the network transports,
synchronously inside ``send``: a piece is validated, copied and scattered before ``send`` returns.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from baton.v1 import kv_transfer_pb2
from kv_transfer.base import (
    KVReceiver,
    KVSender,
    TransferError,
    TransferHandle,
    TransferState,
    check_piece,
    gather_blocks,
)
from kv_transfer.reservations import ReservationTable
from kv_transfer.wire import CHECKSUMS, as_secret, build_header, handshake_mac, new_nonce

ADDRESS_PREFIX = "loopback:"


class LoopbackHub:
    """Name service of in-process receivers (the stand-in for host:port)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._receivers: dict[str, LoopbackReceiver] = {}

    def register(self, receiver: LoopbackReceiver) -> None:
        with self._lock:
            self._receivers[receiver.address] = receiver

    def unregister(self, address: str) -> None:
        with self._lock:
            self._receivers.pop(address, None)

    def lookup(self, address: str) -> LoopbackReceiver:
        with self._lock:
            receiver = self._receivers.get(address)
        if receiver is None:
            raise TransferError("UNAVAILABLE", f"no receiver at {address!r}")
        return receiver


class LoopbackReceiver(KVReceiver):
    def __init__(
        self, hub: LoopbackHub, kv_cache: torch.Tensor, secret: bytes | str, receiver_id: str = ""
    ) -> None:
        self._secret = as_secret(secret)
        self.receiver_id = receiver_id or f"loopback-{uuid.uuid4().hex[:8]}"
        self._hub = hub
        self._table = ReservationTable(kv_cache, ADDRESS_PREFIX + self.receiver_id, self.receiver_id)
        hub.register(self)

    @property
    def address(self) -> str:
        return self._table.address

    @property
    def num_reservations(self) -> int:
        return len(self._table)

    @property
    def table(self) -> ReservationTable:
        return self._table

    def authenticate(self, client_nonce: bytes, respond: Callable[[bytes, bytes], bytes]) -> None:
        """The same challenge-response as the network handshake, done with two function calls."""
        server_nonce = new_nonce()
        client_mac = respond(server_nonce, handshake_mac(self._secret, b"R", client_nonce, server_nonce))
        if client_mac != handshake_mac(self._secret, b"S", client_nonce, server_nonce):
            raise TransferError("UNAUTHENTICATED", "sender failed authentication (wrong shared secret?)")

    def reserve(
        self, request_id, block_ids_dst, num_tokens, deadline, *, first_block_index=0
    ) -> TransferHandle:
        return self._table.reserve(request_id, block_ids_dst, num_tokens, deadline, first_block_index)

    def poll(self, handle: TransferHandle) -> TransferState:
        return self._table.poll(handle)

    def wait(self, handle: TransferHandle, timeout: float) -> TransferState:
        return self._table.wait(handle, timeout)

    def error(self, handle: TransferHandle) -> str | None:
        return self._table.error(handle)

    def release(self, handle: TransferHandle) -> None:
        self._table.release(handle)

    def close(self) -> None:
        self._hub.unregister(self.address)
        self._table.fail_all("receiver closed")


@dataclass
class _Outgoing:
    state: TransferState = TransferState.BOOTSTRAPPING
    error: str | None = None
    pieces: int = 0
    finished: bool = False
    sent: set[int] = field(default_factory=set)


class LoopbackSender(KVSender):
    def __init__(
        self,
        hub: LoopbackHub,
        secret: bytes | str,
        *,
        max_message_bytes: int = 64 << 20,
        checksum: str = "none",
    ) -> None:
        self._hub = hub
        self._secret = as_secret(secret)
        self._max_message_bytes = max_message_bytes
        self._checksum = CHECKSUMS[checksum]
        self._lock = threading.Lock()
        self._transfers: dict[str, _Outgoing] = {}
        self._authenticated: set[str] = set()

    def send(self, handle, src_block_ids, kv_cache, *, dst_block_offset=0, last=True) -> None:
        src = check_piece(handle, src_block_ids, kv_cache, dst_block_offset)
        with self._lock:
            outgoing = self._transfers.setdefault(handle.handle_id, _Outgoing())
            if outgoing.finished:
                raise ValueError(f"transfer {handle.handle_id} already got its last piece")
            outgoing.finished = last
        if outgoing.state.is_terminal:
            return
        try:
            receiver = self._connect(handle.address)
            if src:
                piece = gather_blocks(kv_cache, src)
                header = build_header(
                    handle, dst_block_offset, piece, outgoing.pieces, self._max_message_bytes, self._checksum
                )
                ticket = receiver.table.accept_header(header, owner=self)
                outgoing.state = TransferState.TRANSFERRING
                ticket.staging.copy_(piece)
                receiver.table.land(ticket)
                outgoing.pieces += 1
            if last:
                done = kv_transfer_pb2.TransferDone(
                    request_id=handle.request_id, handle_id=handle.handle_id, num_pieces=outgoing.pieces
                )
                receiver.table.finish(done, owner=self)
                outgoing.state = TransferState.SUCCESS
        except TransferError as exc:
            outgoing.state, outgoing.error = TransferState.FAILED, str(exc)

    def _connect(self, address: str) -> LoopbackReceiver:
        receiver = self._hub.lookup(address)
        if address not in self._authenticated:
            client_nonce = new_nonce()

            def respond(server_nonce: bytes, server_mac: bytes) -> bytes:
                if server_mac != handshake_mac(self._secret, b"R", client_nonce, server_nonce):
                    raise TransferError(
                        "UNAUTHENTICATED", "receiver failed authentication (wrong shared secret?)"
                    )
                return handshake_mac(self._secret, b"S", client_nonce, server_nonce)

            receiver.authenticate(client_nonce, respond)
            self._authenticated.add(address)
        return receiver

    def poll(self, handle: TransferHandle) -> TransferState:
        outgoing = self._get(handle)
        if not outgoing.state.is_terminal and handle.remaining() < 0:
            outgoing.state, outgoing.error = TransferState.FAILED, "deadline exceeded"
        return outgoing.state

    def error(self, handle: TransferHandle) -> str | None:
        self.poll(handle)
        return self._get(handle).error

    def release(self, handle: TransferHandle) -> None:
        with self._lock:
            self._transfers.pop(handle.handle_id, None)

    def close(self) -> None:
        with self._lock:
            for outgoing in self._transfers.values():
                if not outgoing.state.is_terminal:
                    outgoing.state, outgoing.error = TransferState.FAILED, "sender closed"

    def _get(self, handle: TransferHandle) -> _Outgoing:
        with self._lock:
            outgoing = self._transfers.get(handle.handle_id)
        if outgoing is None:
            raise KeyError(f"unknown transfer handle {handle.handle_id!r}")
        return outgoing
