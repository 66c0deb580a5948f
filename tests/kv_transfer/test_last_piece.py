"""A piece sent as the transfer's last completes it on arrival (gloo, in one process): the receiver is
at SUCCESS before it answers, no done marker needed; a ``last`` piece that leaves blocks out fails; a
done marker sent anyway is checked again and changes nothing."""

from __future__ import annotations

import time

import pytest
import torch

from baton.v1 import kv_transfer_pb2
from kv_transfer.base import TransferError, TransferState, gather_blocks
from kv_transfer.dist_receiver import DistKVReceiver
from kv_transfer.dist_sender import SenderConnection
from kv_transfer.pair import Backend
from kv_transfer.wire import CHECKSUMS, as_secret, build_header, message_views
from tests.kv_transfer.harness import random_cache

SECRET = "last-piece-secret"
LAYERS, BLOCKS, BLOCK_SIZE, HEADS, HEAD_DIM = 2, 8, 4, 2, 8


DST = [5, 2, 7]  # the reserved blocks


@pytest.fixture()
def pair():
    """A receiver with a reservation of ``DST``, a connection to it, and the sender's source blocks."""
    cache = torch.zeros(LAYERS, 2, BLOCKS, BLOCK_SIZE, HEADS, HEAD_DIM)
    receiver = DistKVReceiver(cache, backend="gloo", secret=SECRET)
    handle = receiver.reserve("req", DST, len(DST) * BLOCK_SIZE, time.time() + 30)
    connection = SenderConnection.open(
        handle.address, backend=Backend("gloo", torch.device("cpu")), secret=as_secret(SECRET), sender_id="s",
        local_host="127.0.0.1", deadline=time.time() + 30, group_timeout=30,
    )  # fmt: skip
    source = random_cache(LAYERS, len(DST), BLOCK_SIZE, HEADS, HEAD_DIM, torch.float32, "cpu", seed=3)
    yield receiver, cache, handle, connection, source
    connection.close()
    receiver.close()


def _send_last(connection: SenderConnection, handle, source: torch.Tensor, blocks: int) -> None:
    """Send blocks ``[0, blocks)`` of ``source`` as one piece marked as the transfer's last."""
    piece = gather_blocks(source, range(blocks))
    header = build_header(handle, 0, piece, 0, 1 << 20, CHECKSUMS["none"])
    header.last = True
    deadline = time.time() + 30
    connection.send_header(header, deadline)
    for work in connection.post_messages(message_views(piece, header)):
        work.wait()


def test_last_piece_completes_the_transfer_before_its_answer(pair) -> None:
    receiver, cache, handle, connection, source = pair
    _send_last(connection, handle, source, len(DST))
    connection.read_ack(time.time() + 30)
    assert receiver.poll(handle) is TransferState.SUCCESS  # already, when the answer left
    assert torch.equal(gather_blocks(cache, DST), gather_blocks(source, range(len(DST))))


def test_last_piece_that_leaves_blocks_out_fails_the_transfer(pair) -> None:
    receiver, _, handle, connection, source = pair
    _send_last(connection, handle, source, len(DST) - 1)  # claims to be last, one block short
    with pytest.raises(TransferError, match="never arrived"):
        connection.read_ack(time.time() + 30)
    assert receiver.poll(handle) is TransferState.FAILED


def test_done_marker_after_a_last_piece_changes_nothing(pair) -> None:
    receiver, _, handle, connection, source = pair
    _send_last(connection, handle, source, len(DST))
    connection.read_ack(time.time() + 30)
    done = kv_transfer_pb2.TransferDone(request_id="req", handle_id=handle.handle_id, num_pieces=1)
    connection.send_done(done, time.time() + 30)
    connection.read_ack(time.time() + 30)  # the same checks pass again
    assert receiver.poll(handle) is TransferState.SUCCESS
