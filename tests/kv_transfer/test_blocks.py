"""Unit tests of the layer-range block copies and of landing a piece layer by layer."""

from __future__ import annotations

import time

import pytest
import torch

from baton.v1 import kv_transfer_pb2
from kv_transfer.base import TransferError, TransferState, gather_blocks
from kv_transfer.blocks import (
    BlockMover,
    aligned_message_bytes,
    block_runs,
    block_words,
    gather_chunks,
    layer_bytes,
    layers_covered,
    layers_needed,
)
from kv_transfer.reservations import ReservationTable
from kv_transfer.wire import CHECKSUMS, build_header

CASES = {
    "one run": [4, 5, 6, 7, 8],
    "two runs": [9, 10, 11, 0, 1],
    "scattered": [13, 2, 7, 0, 11, 5, 9, 3, 14, 1],  # more runs than MAX_RUNS: the indexed path
    "single": [6],
}


def test_block_runs() -> None:
    assert block_runs([3, 4, 5, 9, 10, 2]) == [(0, 3, 3), (3, 9, 2), (5, 2, 1)]
    assert block_runs([]) == []
    assert block_runs([7]) == [(0, 7, 1)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
@pytest.mark.parametrize("case", list(CASES))
def test_mover_matches_the_reference_gather_and_scatter(case: str, dtype) -> None:
    ids = CASES[case]
    cache = torch.randn(5, 2, 16, 4, 2, 8).to(dtype)
    mover = BlockMover(ids, cache.device)
    assert (mover.runs is None) == (case == "scattered")
    assert (mover.runs is not None and len(mover.runs) == 1) == (case in ("one run", "single"))
    piece = torch.zeros(5, 2, len(ids), 4, 2, 8, dtype=dtype)
    cache_words = block_words(cache)
    piece_words = block_words(piece, cache_words.dtype)
    for lo, hi in [(0, 2), (2, 3), (3, 5)]:  # layer ranges, in pieces
        mover.gather(cache_words, piece_words[lo:hi], lo, hi)
    assert torch.equal(piece, gather_blocks(cache, ids))

    target = torch.zeros_like(cache)
    mover.scatter(block_words(target), piece_words[1:4], 1, 4)  # only layers 1..3
    assert torch.equal(target[1:4, :, ids], cache[1:4, :, ids])
    assert not target[[0, 4]].any(), "layers outside the range were written"
    others = [b for b in range(16) if b not in ids]
    assert not target[:, :, others].any(), "blocks outside the ids were written"


def test_block_words_widen_only_when_bytes_allow() -> None:
    assert block_words(torch.zeros(2, 2, 3, 4, 2, 8, dtype=torch.bfloat16)).dtype == torch.int64
    assert block_words(torch.zeros(2, 2, 3, 1, 1, 2, dtype=torch.bfloat16)).dtype == torch.int32
    odd = block_words(torch.zeros(2, 2, 3, 1, 1, 3, dtype=torch.bfloat16))
    assert odd.dtype == torch.bfloat16 and odd.shape == (2, 2, 3, 3)
    # A piece is seen in the cache's words, even where it could be seen in wider ones.
    assert block_words(torch.zeros(2, 2, 3, 4, 2, 8, dtype=torch.bfloat16), torch.int32).dtype == torch.int32
    # A cache whose storage offset forbids 8-byte words: the piece must follow it, not widen on its own.
    shifted = torch.zeros(2 * 2 * 3 * 4 * 2 * 8 + 1, dtype=torch.bfloat16)[1:].view(2, 2, 3, 4, 2, 8)
    assert block_words(shifted).dtype == torch.bfloat16


def test_message_and_chunk_arithmetic() -> None:
    one_layer = layer_bytes([32, 2, 128, 16, 8, 128], 2)
    assert one_layer == 8 << 20
    assert aligned_message_bytes(32 << 20, one_layer) == 32 << 20
    assert aligned_message_bytes(30 << 20, one_layer) == 24 << 20  # whole layers only
    assert aligned_message_bytes(1000, one_layer) == 1000  # sub-layer messages stay as asked
    assert gather_chunks(32, 4) == [4, 12, 28, 32]
    assert gather_chunks(3, 1) == [1, 3]
    assert gather_chunks(5, 8) == [5]
    assert layers_needed(4096 + 1, 4096) == 2 and layers_needed(8192, 4096) == 2
    assert layers_covered(8191, 4096, 3) == 1 and layers_covered(1 << 20, 4096, 3) == 3


def _table_and_ticket(layers: int = 3):
    cache = torch.zeros(layers, 2, 8, 4, 2, 8)
    table = ReservationTable(cache, "127.0.0.1:1", "rx")
    handle = table.reserve("req", [5, 1, 6], num_tokens=12, deadline=time.time() + 30)
    source = torch.randn(layers, 2, 3, 4, 2, 8)
    header = build_header(handle, 0, source, 0, 1 << 20, CHECKSUMS["none"])
    ticket = table.accept_header(header, owner="link")
    ticket.staging.copy_(source)
    return table, handle, ticket, cache, source


def test_landing_layer_by_layer_then_completing() -> None:
    table, handle, ticket, cache, source = _table_and_ticket()
    table.land_layers(ticket, 0, 1)
    assert torch.equal(cache[0, :, [5, 1, 6]], source[0]) and not cache[1:].any()
    table.land_layers(ticket, 1, 3)
    table.complete_piece(ticket)
    assert torch.equal(cache[:, :, [5, 1, 6]], source)
    table.finish(
        kv_transfer_pb2.TransferDone(request_id="req", handle_id=handle.handle_id, num_pieces=1), "link"
    )
    assert table.poll(handle) is TransferState.SUCCESS


def test_release_mid_piece_stops_later_layers() -> None:
    table, handle, ticket, cache, source = _table_and_ticket()
    table.land_layers(ticket, 0, 1)
    table.release(handle)
    with pytest.raises(TransferError) as raised:
        table.land_layers(ticket, 1, 3)
    assert raised.value.code == "NOT_FOUND"
    with pytest.raises(TransferError):
        table.complete_piece(ticket)
    assert torch.equal(cache[0, :, [5, 1, 6]], source[0])
    assert not cache[1:].any(), "a released reservation was written"
