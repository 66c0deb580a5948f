"""Wire pieces shared by every transport: control framing, the HMAC handshake, descriptors.

Control messages are ``baton.v1.ControlMessage`` protobufs, each prefixed by its length as a 4-byte
big-endian integer (see proto/baton/v1/kv_transfer.proto). Nothing here deserializes anything but
protobuf and raw tensor bytes.

Protocol 2, one piece: S -> R ``TransferHeader``, and right behind it the header's ``num_messages``
raw messages over the pair's process group (the sender does not wait for a go-ahead). The receiver
posts its receives into a staging buffer as soon as the header's framing is sane (``framing_problem``),
validates the header against the reservation, and answers once per piece: ``Ack`` once the piece
landed, or ``Nack`` (a refused piece's messages are still received into staging and dropped, so the
pair stays in step). A header whose framing is not sane is refused and the connection closed, since
its messages cannot be matched. A piece whose header says ``last`` completes the transfer when it
lands (the checks of ``TransferDone``), before the receiver answers it, so the transfer is complete on
the receiver without another message. A transfer whose last call carries no blocks ends with a bare
``TransferDone`` instead; it may follow a piece's messages at once and gets its own ``Ack`` / ``Nack``,
after the piece's answer.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import select
import socket
import struct
import time
import zlib

import torch

from baton.v1 import common_pb2, kv_transfer_pb2, worker_pb2
from kv_transfer.base import KVLayout, TransferError, TransferHandle

PROTOCOL_VERSION = 2  # 2: a piece's messages follow its header without a go-ahead
HANDSHAKE_CONTEXT = b"baton-kv-transfer-v1/"
NONCE_BYTES = 32
MAX_FRAME_BYTES = 4 << 20  # control messages are small; a larger frame is a protocol error
_LENGTH = struct.Struct(">I")

Checksum = kv_transfer_pb2.ChecksumAlgorithm
CHECKSUMS = {
    "none": Checksum.CHECKSUM_ALGORITHM_NONE,
    "crc32": Checksum.CHECKSUM_ALGORITHM_CRC32,
    "sha256": Checksum.CHECKSUM_ALGORITHM_SHA256,
}


class PeerGone(ConnectionError):
    """The control socket closed: the peer process left or died."""


# ---------------------------------------------------------------------------------------------- framing


def send_message(sock: socket.socket, message: kv_transfer_pb2.ControlMessage, deadline: float) -> None:
    data = message.SerializeToString()
    sock.settimeout(max(deadline - time.time(), 1e-3))
    try:
        sock.sendall(_LENGTH.pack(len(data)) + data)
    except TimeoutError:
        raise TimeoutError("timed out sending a control message") from None
    except OSError as exc:
        raise PeerGone(f"control socket failed while sending: {exc}") from exc


def recv_message(sock: socket.socket, deadline: float | None) -> kv_transfer_pb2.ControlMessage:
    """Read one framed message; ``deadline=None`` waits as long as the socket stays open."""
    (length,) = _LENGTH.unpack(_recv_exact(sock, _LENGTH.size, deadline))
    if length > MAX_FRAME_BYTES:
        raise TransferError("INVALID_ARGUMENT", f"control frame of {length} bytes exceeds {MAX_FRAME_BYTES}")
    message = kv_transfer_pb2.ControlMessage()
    try:
        message.ParseFromString(_recv_exact(sock, length, deadline))
    except Exception as exc:  # protobuf raises DecodeError (a subclass of Exception) on garbage
        raise TransferError("INVALID_ARGUMENT", f"undecodable control frame: {exc}") from exc
    return message


def _recv_exact(sock: socket.socket, size: int, deadline: float | None) -> bytes:
    chunks = bytearray()
    while len(chunks) < size:
        sock.settimeout(None if deadline is None else max(deadline - time.time(), 1e-3))
        try:
            chunk = sock.recv(size - len(chunks))
        except TimeoutError:
            raise TimeoutError("timed out waiting for the peer's control message") from None
        except OSError as exc:
            raise PeerGone(f"control socket failed: {exc}") from exc
        if not chunk:
            raise PeerGone("peer closed the control connection")
        chunks += chunk
    return bytes(chunks)


def peer_closed(sock: socket.socket) -> bool:
    """True when the peer closed or reset the socket (checked without consuming data).

    Where the OS reports a peer's close even behind unread data (Linux ``POLLRDHUP``), that is used:
    a sender queues its done marker while the payload is in flight, and its death must still show.
    """
    if hasattr(select, "POLLRDHUP"):
        poller = select.poll()
        poller.register(sock, select.POLLRDHUP | select.POLLHUP | select.POLLERR)
        try:
            return bool(poller.poll(0))
        except (OSError, ValueError):
            return True
    readable, _, _ = select.select([sock], [], [], 0)
    if not readable:
        return False
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def expect(message: kv_transfer_pb2.ControlMessage, kind: str) -> object:
    """The payload of ``message`` if it is a ``kind``; a Nack or Goodbye becomes a TransferError."""
    got = message.WhichOneof("kind")
    if got == kind:
        return getattr(message, kind)
    if got == "nack":
        raise error_from_proto(message.nack.error)
    if got == "auth_result" and not message.auth_result.ok:
        raise error_from_proto(message.auth_result.error)
    if got == "goodbye":
        raise PeerGone(f"peer said goodbye: {message.goodbye.reason}")
    raise TransferError("INVALID_ARGUMENT", f"expected {kind}, got {got}")


# -------------------------------------------------------------------------------------------- handshake


def as_secret(secret: bytes | str) -> bytes:
    key = secret.encode() if isinstance(secret, str) else bytes(secret)
    if not key:
        raise ValueError("the KV transfer shared secret must not be empty")
    return key


def new_nonce() -> bytes:
    return os.urandom(NONCE_BYTES)


def handshake_mac(secret: bytes, role: bytes, client_nonce: bytes, server_nonce: bytes) -> bytes:
    """HMAC-SHA256 binding the role (b"S" sender, b"R" receiver) to both nonces."""
    return hmac.new(secret, HANDSHAKE_CONTEXT + role + client_nonce + server_nonce, hashlib.sha256).digest()


def client_handshake(sock: socket.socket, secret: bytes, sender_id: str, deadline: float) -> str:
    """Authenticate both ways as the sender; returns the receiver's id."""
    client_nonce = new_nonce()
    hello = kv_transfer_pb2.Hello(
        protocol_version=PROTOCOL_VERSION, sender_id=sender_id, client_nonce=client_nonce
    )
    send_message(sock, kv_transfer_pb2.ControlMessage(hello=hello), deadline)
    challenge = expect(recv_message(sock, deadline), "challenge")
    if challenge.protocol_version != PROTOCOL_VERSION:
        raise TransferError(
            "INVALID_ARGUMENT",
            f"receiver speaks protocol {challenge.protocol_version}, we speak {PROTOCOL_VERSION}",
        )
    if len(challenge.server_nonce) != NONCE_BYTES:
        raise TransferError("UNAUTHENTICATED", "receiver sent a malformed nonce")
    expected = handshake_mac(secret, b"R", client_nonce, challenge.server_nonce)
    if not hmac.compare_digest(expected, challenge.server_mac):
        raise TransferError("UNAUTHENTICATED", "receiver failed authentication (wrong shared secret?)")
    response = kv_transfer_pb2.AuthResponse(
        client_mac=handshake_mac(secret, b"S", client_nonce, challenge.server_nonce)
    )
    send_message(sock, kv_transfer_pb2.ControlMessage(auth_response=response), deadline)
    expect(recv_message(sock, deadline), "auth_result")
    return challenge.receiver_id


def server_handshake(sock: socket.socket, secret: bytes, receiver_id: str, deadline: float) -> str:
    """Authenticate both ways as the receiver; returns the sender's id. Raises on a wrong secret."""
    hello = expect(recv_message(sock, deadline), "hello")
    if hello.protocol_version != PROTOCOL_VERSION or len(hello.client_nonce) != NONCE_BYTES:
        raise TransferError("INVALID_ARGUMENT", "malformed hello")
    server_nonce = new_nonce()
    challenge = kv_transfer_pb2.Challenge(
        protocol_version=PROTOCOL_VERSION,
        receiver_id=receiver_id,
        server_nonce=server_nonce,
        server_mac=handshake_mac(secret, b"R", hello.client_nonce, server_nonce),
    )
    send_message(sock, kv_transfer_pb2.ControlMessage(challenge=challenge), deadline)
    response = expect(recv_message(sock, deadline), "auth_response")
    if not hmac.compare_digest(
        handshake_mac(secret, b"S", hello.client_nonce, server_nonce), response.client_mac
    ):
        error = common_pb2.Error(code=common_pb2.ERROR_CODE_UNAUTHENTICATED, message="wrong shared secret")
        send_message(
            sock,
            kv_transfer_pb2.ControlMessage(auth_result=kv_transfer_pb2.AuthResult(ok=False, error=error)),
            deadline,
        )
        raise TransferError("UNAUTHENTICATED", f"sender {hello.sender_id!r} failed authentication")
    send_message(
        sock, kv_transfer_pb2.ControlMessage(auth_result=kv_transfer_pb2.AuthResult(ok=True)), deadline
    )
    return hello.sender_id


# ------------------------------------------------------------------------------------------ descriptors


def error_to_proto(error: TransferError, retryable: bool = False) -> common_pb2.Error:
    code = (
        common_pb2.ErrorCode.Value(f"ERROR_CODE_{error.code}")
        if f"ERROR_CODE_{error.code}" in common_pb2.ErrorCode.keys()
        else common_pb2.ERROR_CODE_INTERNAL
    )
    return common_pb2.Error(code=code, message=error.message, retryable=retryable)


def error_from_proto(error: common_pb2.Error) -> TransferError:
    name = (
        common_pb2.ErrorCode.Name(error.code).removeprefix("ERROR_CODE_")
        if error.code in common_pb2.ErrorCode.values()
        else "INTERNAL"
    )
    return TransferError(name, error.message or "peer rejected the request")


def layout_to_proto(layout: KVLayout) -> common_pb2.KVLayout:
    return common_pb2.KVLayout(
        num_layers=layout.num_layers,
        block_size=layout.block_size,
        num_kv_heads=layout.num_kv_heads,
        head_dim=layout.head_dim,
        dtype=layout.dtype,
    )


def layout_from_proto(message: common_pb2.KVLayout) -> KVLayout:
    return KVLayout(
        message.num_layers, message.block_size, message.num_kv_heads, message.head_dim, message.dtype
    )


def handle_to_kv_target(handle: TransferHandle, model_fingerprint: str = "") -> worker_pb2.KVTarget:
    return worker_pb2.KVTarget(
        decode_worker_id=handle.receiver_id,
        transfer_address=handle.address,
        handle_id=handle.handle_id,
        block_ids=handle.block_ids,
        num_tokens=handle.num_tokens,
        layout=layout_to_proto(handle.layout),
        deadline_ms=int(handle.deadline * 1000),
        first_block_index=handle.first_block_index,
        model_fingerprint=model_fingerprint,
    )


def handle_from_kv_target(target: worker_pb2.KVTarget, request_id: str) -> TransferHandle:
    """Rebuild a handle from its wire form; raises ValueError on a malformed target."""
    if not target.handle_id or not target.transfer_address:
        raise ValueError("KVTarget needs handle_id and transfer_address")
    if target.num_tokens <= 0 or target.first_block_index < 0:
        raise ValueError(
            f"KVTarget has num_tokens={target.num_tokens}, first_block_index={target.first_block_index}"
        )
    layout = layout_from_proto(target.layout)
    expected = layout.num_blocks_for(target.num_tokens) - target.first_block_index
    if len(target.block_ids) != expected:
        raise ValueError(
            f"KVTarget lists {len(target.block_ids)} blocks, {expected} expected for {target.num_tokens} tokens"
        )
    return TransferHandle(
        request_id=request_id,
        handle_id=target.handle_id,
        receiver_id=target.decode_worker_id,
        address=target.transfer_address,
        block_ids=tuple(target.block_ids),
        num_tokens=target.num_tokens,
        layout=layout,
        deadline=target.deadline_ms / 1000,
        first_block_index=target.first_block_index,
    )


def checksum(algorithm: int, payload: torch.Tensor) -> bytes:
    """Digest of a contiguous tensor's bytes (copied to host when it lives on a GPU)."""
    if algorithm == Checksum.CHECKSUM_ALGORITHM_NONE:
        return b""
    data = payload.contiguous().view(-1).view(torch.uint8).cpu().numpy()
    if algorithm == Checksum.CHECKSUM_ALGORITHM_CRC32:
        return zlib.crc32(data).to_bytes(4, "big")
    if algorithm == Checksum.CHECKSUM_ALGORITHM_SHA256:
        return hashlib.sha256(data).digest()
    raise TransferError("INVALID_ARGUMENT", f"unknown checksum algorithm {algorithm}")


def piece_header(
    handle: TransferHandle,
    dst_block_offset: int,
    num_blocks: int,
    piece_index: int,
    max_message_bytes: int,
    checksum_algorithm: int = Checksum.CHECKSUM_ALGORITHM_NONE,
    digest: bytes = b"",
    last: bool = False,
) -> kv_transfer_pb2.TransferHeader:
    """Describe a piece of ``num_blocks`` blocks from the layout alone (no tensor needed).

    So the header can leave before the piece is allocated or gathered; only a checksum (``digest``,
    over the gathered bytes) has to wait for the bytes.
    """
    layout = handle.layout
    payload_bytes = num_blocks * layout.block_bytes
    message_bytes = min(max_message_bytes, payload_bytes)
    return kv_transfer_pb2.TransferHeader(
        request_id=handle.request_id,
        handle_id=handle.handle_id,
        dst_block_offset=dst_block_offset,
        block_ids=handle.block_ids[dst_block_offset : dst_block_offset + num_blocks],
        num_layers=layout.num_layers,
        dtype=layout.dtype,
        shape=layout.piece_shape(num_blocks),
        payload_bytes=payload_bytes,
        message_bytes=message_bytes,
        num_messages=-(-payload_bytes // message_bytes) if payload_bytes else 0,
        checksum_algorithm=checksum_algorithm,
        checksum=digest,
        piece_index=piece_index,
        last=last,
    )


def build_header(
    handle: TransferHandle,
    dst_block_offset: int,
    piece: torch.Tensor,
    piece_index: int,
    max_message_bytes: int,
    checksum_algorithm: int,
) -> kv_transfer_pb2.TransferHeader:
    """Describe a gathered piece ``[n, num_layers, 2, block_size, heads, head_dim]`` (with its digest)."""
    header = piece_header(handle, dst_block_offset, piece.shape[0], piece_index, max_message_bytes)
    header.shape[:] = list(piece.shape)
    payload_bytes = piece.numel() * piece.element_size()
    header.payload_bytes = payload_bytes
    header.message_bytes = min(max_message_bytes, payload_bytes)
    header.num_messages = math.ceil(payload_bytes / max_message_bytes)
    header.checksum_algorithm = checksum_algorithm
    header.checksum = checksum(checksum_algorithm, piece)
    return header


def framing_problem(header: kv_transfer_pb2.TransferHeader, max_payload_bytes: int) -> str | None:
    """Why the header's message arithmetic cannot be received safely, or None.

    Checked before the header is validated against any reservation: it bounds the staging buffer
    (``max_payload_bytes``, the receiver's whole cache) and the number of receives posted for it.
    """
    payload, size, count = header.payload_bytes, header.message_bytes, header.num_messages
    if not 0 < payload <= max_payload_bytes:
        return f"payload of {payload} bytes is outside (0, {max_payload_bytes}]"
    if size <= 0 or count != math.ceil(payload / size):
        return f"payload of {payload} bytes cannot travel as {count} messages of {size} bytes"
    return None


def message_views(piece: torch.Tensor, header: kv_transfer_pb2.TransferHeader) -> list[torch.Tensor]:
    """The byte ranges of a contiguous piece that travel as separate messages, in order."""
    flat = piece.view(-1).view(torch.uint8)
    size = header.message_bytes
    return [flat[i * size : (i + 1) * size] for i in range(header.num_messages)]
