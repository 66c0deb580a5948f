"""Unit tests of the wire helpers: framing, the HMAC handshake, descriptors and their conversions."""

from __future__ import annotations

import socket
import struct
import threading
import time

import pytest
import torch

from baton.v1 import kv_transfer_pb2, worker_pb2
from kv_transfer.base import KVLayout, TransferError, TransferHandle, gather_blocks, scatter_blocks
from kv_transfer.wire import (
    CHECKSUMS,
    MAX_FRAME_BYTES,
    PeerGone,
    build_header,
    checksum,
    client_handshake,
    handle_from_kv_target,
    handle_to_kv_target,
    message_views,
    recv_message,
    send_message,
    server_handshake,
)

LAYOUT = KVLayout(num_layers=2, block_size=4, num_kv_heads=2, head_dim=8, dtype="bfloat16")


def _handle(**changes) -> TransferHandle:
    fields = dict(
        request_id="r", handle_id="h" * 32, receiver_id="d0", address="127.0.0.1:9", block_ids=(4, 9, 2),
        num_tokens=11, layout=LAYOUT, deadline=1_900_000_000.25, first_block_index=0,
    )  # fmt: skip
    fields.update(changes)
    return TransferHandle(**fields)


def test_handle_round_trips_through_kv_target() -> None:
    handle = _handle(block_ids=(7, 1), num_tokens=17, first_block_index=3)
    wire = worker_pb2.KVTarget.FromString(handle_to_kv_target(handle, "fp").SerializeToString())
    assert wire.model_fingerprint == "fp"
    assert handle_from_kv_target(wire, "r") == handle


@pytest.mark.parametrize(
    ("change", "fragment"),
    [({"block_ids": [1]}, "blocks"), ({"handle_id": ""}, "handle_id"), ({"num_tokens": 0}, "num_tokens")],
)
def test_malformed_kv_target_is_refused(change, fragment) -> None:
    wire = handle_to_kv_target(_handle())
    for key, value in change.items():
        wire.ClearField(key)
        if isinstance(value, list):
            getattr(wire, key).extend(value)
        elif value:
            setattr(wire, key, value)
    with pytest.raises(ValueError, match=fragment):
        handle_from_kv_target(wire, "r")


def test_layout_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="dtype"):
        KVLayout(2, 4, 2, 8, "int8")
    with pytest.raises(ValueError, match="block_size"):
        KVLayout(2, 0, 2, 8, "float32")
    assert LAYOUT.block_bytes == 2 * 2 * 4 * 2 * 8 * 2
    assert LAYOUT.num_blocks_for(9) == 3


def test_gather_then_scatter_moves_exact_blocks() -> None:
    src = torch.randn(2, 2, 10, 4, 2, 8)
    dst = torch.zeros_like(src)
    piece = gather_blocks(src, [3, 0, 7])
    assert piece.shape == (3, 2, 2, 4, 2, 8) and piece.is_contiguous()  # block-major
    scatter_blocks(dst, [1, 8, 5], piece)
    assert torch.equal(dst[:, :, [1, 8, 5]], src[:, :, [3, 0, 7]])
    assert not dst[:, :, [0, 2, 3, 4, 6, 9]].any()


def test_header_describes_piece_and_views_cover_it_exactly() -> None:
    piece = gather_blocks(torch.randn(2, 2, 10, 4, 2, 8).to(torch.bfloat16), [1, 2, 3])
    header = build_header(_handle(), 0, piece, 0, 1000, CHECKSUMS["crc32"])
    assert list(header.shape) == [3, 2, 2, 4, 2, 8]
    assert header.payload_bytes == 3 * LAYOUT.block_bytes == 1536
    assert (header.message_bytes, header.num_messages) == (1000, 2)
    assert list(header.block_ids) == [4, 9, 2]
    views = message_views(piece, header)
    assert [v.numel() for v in views] == [1000, 536]
    assert torch.equal(torch.cat(views), piece.view(-1).view(torch.uint8))
    assert header.checksum == checksum(CHECKSUMS["crc32"], piece)
    assert checksum(CHECKSUMS["sha256"], piece) != checksum(CHECKSUMS["sha256"], piece + 1)


def _pair():
    left, right = socket.socketpair()
    return left, right


def _handshake(client_secret: bytes, server_secret: bytes):
    client, server = _pair()
    result = {}

    def serve():
        try:
            result["server"] = server_handshake(server, server_secret, "rx", time.time() + 5)
        except Exception as exc:
            result["server"] = exc

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        result["client"] = client_handshake(client, client_secret, "tx", time.time() + 5)
    except Exception as exc:
        result["client"] = exc
        client.close()  # as SenderConnection.open does: the receiver sees EOF at once
    thread.join()
    client.close()
    server.close()
    return result


def test_handshake_with_the_shared_secret() -> None:
    assert _handshake(b"k", b"k") == {"client": "rx", "server": "tx"}


def test_handshake_with_a_wrong_secret_fails_on_both_sides() -> None:
    result = _handshake(b"wrong", b"right")
    assert isinstance(result["client"], TransferError) and result["client"].code == "UNAUTHENTICATED"
    assert isinstance(result["server"], TransferError | PeerGone)


def test_silent_peer_times_out_at_the_deadline() -> None:
    client, server = _pair()
    start = time.monotonic()
    with pytest.raises(TimeoutError):
        client_handshake(client, b"k", "tx", time.time() + 0.3)
    assert 0.2 < time.monotonic() - start < 1.5
    client.close()
    server.close()


def test_oversized_and_garbage_frames_are_refused() -> None:
    client, server = _pair()
    client.sendall(struct.pack(">I", MAX_FRAME_BYTES + 1))
    with pytest.raises(TransferError, match="exceeds"):
        recv_message(server, time.time() + 1)
    client.sendall(struct.pack(">I", 3) + b"\xff\xff\xff")
    with pytest.raises(TransferError, match="undecodable"):
        recv_message(server, time.time() + 1)
    send_message(
        client, kv_transfer_pb2.ControlMessage(goodbye=kv_transfer_pb2.Goodbye(reason="bye")), time.time() + 1
    )
    assert recv_message(server, time.time() + 1).goodbye.reason == "bye"
    client.close()
    with pytest.raises(PeerGone):
        recv_message(server, time.time() + 1)
    server.close()
