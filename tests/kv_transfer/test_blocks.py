"""Unit tests of the block-range copies (layer-major and block-major caches) and of landing a piece
block by block."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from baton.v1 import kv_transfer_pb2
from engine.kv_cache.storage import allocate_kv_cache
from kv_transfer.base import RELEASE_WAIT_S, TransferError, TransferState, gather_blocks, scatter_blocks
from kv_transfer.blocks import (
    BlockMover,
    CacheBlocks,
    aligned_message_bytes,
    as_words,
    block_runs,
    blocks_covered,
    blocks_needed,
    runs_within,
)
from kv_transfer.reservations import ReservationTable
from kv_transfer.wire import CHECKSUMS, build_header

CASES = {
    "one run": [4, 5, 6, 7, 8],
    "two runs": [9, 10, 11, 0, 1],
    "scattered": [13, 2, 7, 0, 11, 5, 9, 3, 14, 1],  # more runs than MAX_RUNS: the indexed path
    "single": [6],
}


def _cache(dtype, block_major: bool) -> torch.Tensor:
    cache = allocate_kv_cache(5, 16, 4, 2, 8, dtype=dtype, device="cpu", block_major=block_major)
    cache.copy_(torch.randn(cache.shape).to(dtype))
    return cache


def test_block_runs() -> None:
    assert block_runs([3, 4, 5, 9, 10, 2]) == [(0, 3, 3), (3, 9, 2), (5, 2, 1)]
    assert block_runs([]) == []
    assert block_runs([7]) == [(0, 7, 1)]
    runs = block_runs([3, 4, 5, 9, 10, 2])
    assert list(runs_within(runs, 1, 4)) == [(1, 4, 2), (3, 9, 1)]
    assert list(runs_within(runs, 5, 6)) == [(5, 2, 1)]


def test_the_reference_piece_is_block_major_and_round_trips() -> None:
    cache = _cache(torch.float32, block_major=False)
    piece = gather_blocks(cache, [3, 1])
    assert piece.shape == (2, 5, 2, 4, 2, 8) and piece.is_contiguous()
    assert torch.equal(piece[0], cache[:, :, 3]) and torch.equal(piece[1], cache[:, :, 1])
    target = torch.zeros_like(cache)
    scatter_blocks(target, [7, 0], piece)
    assert torch.equal(target[:, :, 7], cache[:, :, 3]) and torch.equal(target[:, :, 0], cache[:, :, 1])


@pytest.mark.parametrize("block_major", [False, True], ids=["layer-major", "block-major"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
@pytest.mark.parametrize("case", list(CASES))
def test_mover_matches_the_reference_gather_and_scatter(case: str, dtype, block_major: bool) -> None:
    ids = CASES[case]
    cache = _cache(dtype, block_major)
    mover = BlockMover(ids, cache.device)
    assert (mover.runs is None) == (case == "scattered")
    assert (mover.runs is not None and len(mover.runs) == 1) == (case in ("one run", "single"))
    piece = torch.zeros(len(ids), 5, 2, 4, 2, 8, dtype=dtype)
    blocks = CacheBlocks(cache)
    piece_words = as_words(piece, blocks.words.dtype)
    bounds = sorted({0, len(ids) // 3, 2 * len(ids) // 3, len(ids)})
    for lo, hi in zip(bounds, bounds[1:], strict=False):  # block ranges, as messages carry them
        mover.gather(blocks.words, piece_words[lo:hi], lo, hi)
    assert torch.equal(piece, gather_blocks(cache, ids))

    target = allocate_kv_cache(5, 16, 4, 2, 8, dtype=dtype, device="cpu", block_major=block_major)
    lo, hi = (1, len(ids) - 1) if len(ids) > 2 else (0, len(ids))
    mover.scatter(CacheBlocks(target).words, piece_words[lo:hi], lo, hi)
    assert torch.equal(target[:, :, ids[lo:hi]], cache[:, :, ids[lo:hi]])
    others = [b for b in range(16) if b not in ids[lo:hi]]
    assert not target[:, :, others].any(), "blocks outside the range were written"


@pytest.mark.parametrize("block_major", [False, True], ids=["layer-major", "block-major"])
def test_direct_messages_only_from_consecutive_blocks_of_a_block_major_cache(block_major: bool) -> None:
    cache = _cache(torch.bfloat16, block_major)
    blocks = CacheBlocks(cache)
    assert (blocks.rows is not None) == block_major
    mover = BlockMover([4, 5, 6, 9, 10], cache.device)
    direct = mover.direct(blocks, 0, 3)
    if not block_major:
        assert direct is None, "a layer-major cache has no block range to send from"
        return
    assert direct.dtype == torch.uint8 and direct.is_contiguous()
    assert direct.data_ptr() == cache[0, 0, 4].data_ptr(), "a view of the cache, not a copy"
    assert torch.equal(direct, gather_blocks(cache, [4, 5, 6]).view(-1).view(torch.uint8))
    assert mover.direct(blocks, 3, 5) is not None and mover.direct(blocks, 1, 4) is None
    assert BlockMover(CASES["scattered"], cache.device).direct(blocks, 0, 1) is None  # indexed: gathered


def test_block_words_widen_only_when_bytes_allow() -> None:
    assert as_words(torch.zeros(2, 2, 3, 4, 2, 8, dtype=torch.bfloat16)).dtype == torch.int64
    assert as_words(torch.zeros(2, 2, 3, 1, 1, 2, dtype=torch.bfloat16)).dtype == torch.int32
    odd = as_words(torch.zeros(2, 2, 3, 1, 1, 3, dtype=torch.bfloat16))
    assert odd.dtype == torch.bfloat16 and odd.shape == (2, 2, 3, 3)
    # A piece is seen in the cache's words, even where it could be seen in wider ones.
    assert as_words(torch.zeros(2, 2, 3, 4, 2, 8, dtype=torch.bfloat16), torch.int32).dtype == torch.int32
    # A cache whose storage offset forbids 8-byte words: the piece must follow it, not widen on its own.
    shifted = torch.zeros(2 * 2 * 3 * 4 * 2 * 8 + 1, dtype=torch.bfloat16)[1:].view(2, 2, 3, 4, 2, 8)
    assert as_words(shifted).dtype == torch.bfloat16


def test_message_arithmetic() -> None:
    one_block = 2 << 20  # a Llama-3.1-8B block: 32 layers x K,V x 16 tokens x 8 heads x 128 x bf16
    assert aligned_message_bytes(80 << 20, one_block) == 80 << 20
    assert aligned_message_bytes(81 << 20, one_block) == 80 << 20  # whole blocks only
    assert aligned_message_bytes(1000, one_block) == one_block  # never less than one block
    assert blocks_needed(4096 + 1, 4096) == 2 and blocks_needed(8192, 4096) == 2
    assert blocks_covered(8191, 4096, 3) == 1 and blocks_covered(1 << 20, 4096, 3) == 3


def _table_and_ticket(block_major: bool = False):
    cache = allocate_kv_cache(3, 8, 4, 2, 8, dtype=torch.float32, device="cpu", block_major=block_major)
    table = ReservationTable(cache, "127.0.0.1:1", "rx")
    handle = table.reserve("req", [5, 1, 6], num_tokens=12, deadline=time.time() + 30)
    source = torch.randn(3, 3, 2, 4, 2, 8)  # block-major: [blocks, layers, 2, ...]
    header = build_header(handle, 0, source, 0, 1 << 20, CHECKSUMS["none"])
    ticket = table.accept_header(header, owner="link")
    ticket.staging.copy_(source)
    return table, handle, ticket, cache, source


@pytest.mark.parametrize("block_major", [False, True], ids=["layer-major", "block-major"])
def test_landing_block_by_block_then_completing(block_major: bool) -> None:
    table, handle, ticket, cache, source = _table_and_ticket(block_major)
    table.land_blocks(ticket, 0, 1)
    assert torch.equal(cache[:, :, 5], source[0]) and not cache[:, :, [1, 6]].any()
    table.land_blocks(ticket, 1, 3)
    table.complete_piece(ticket)
    assert torch.equal(cache[:, :, [5, 1, 6]], source.permute(1, 2, 0, 3, 4, 5))
    table.finish(
        kv_transfer_pb2.TransferDone(request_id="req", handle_id=handle.handle_id, num_pieces=1), "link"
    )
    assert table.poll(handle) is TransferState.SUCCESS


def test_release_mid_piece_stops_later_blocks() -> None:
    table, handle, ticket, cache, source = _table_and_ticket()
    table.land_blocks(ticket, 0, 1)
    table.release(handle)
    with pytest.raises(TransferError) as raised:
        table.land_blocks(ticket, 1, 3)
    assert raised.value.code == "NOT_FOUND"
    with pytest.raises(TransferError):
        table.complete_piece(ticket)
    assert torch.equal(cache[:, :, 5], source[0])
    assert not cache[:, :, [1, 6]].any(), "a released reservation was written"


def _ticket(table: ReservationTable, block_ids: list[int], message_bytes: int, checksum: str = "none"):
    handle = table.reserve(f"req-{block_ids}", block_ids, num_tokens=4 * len(block_ids), deadline=time.time() + 30)
    source = torch.randn(len(block_ids), 3, 2, 4, 2, 8)
    header = build_header(handle, 0, source, 0, message_bytes, CHECKSUMS[checksum])
    return handle, table.accept_header(header, owner="link")


def test_cache_targets_are_the_reserved_blocks_own_bytes() -> None:
    table = _block_major_table()
    cache = table.kv_cache
    one_block = table.layout.block_bytes
    rows = CacheBlocks(cache).rows
    _, ticket = _ticket(table, [3, 4, 9, 10, 11, 0], 2 * one_block)
    targets = table.cache_targets(ticket)
    assert [t is not None for t in targets] == [True, True, False]  # [3, 4], [9, 10], then [11, 0]
    assert targets[0].data_ptr() == rows[3].data_ptr() and targets[0].numel() == 2 * one_block
    assert targets[1].data_ptr() == rows[9].data_ptr()
    # Framing that cuts blocks (a sender's choice; ours sends whole blocks), and checksummed pieces,
    # are always staged.
    _, cut = _ticket(table, [12, 13], one_block + 16)
    assert cut.header.num_messages == 2 and table.cache_targets(cut) == [None, None]
    _, summed = _ticket(table, [14, 15], one_block, checksum="crc32")
    assert table.cache_targets(summed) == [None, None]


def test_cache_targets_need_a_block_major_cache() -> None:
    cache = allocate_kv_cache(3, 16, 4, 2, 8, dtype=torch.float32, device="cpu", block_major=False)
    table = ReservationTable(cache, "127.0.0.1:1", "rx")
    _, ticket = _ticket(table, [3, 4, 5, 6], 2 * table.layout.block_bytes)
    assert table.cache_targets(ticket) == [None, None]


class _Writer:
    """Cut off, it tears its link down a little later (``teardown_s``), as a connection's thread does."""

    def __init__(self, table: ReservationTable, teardown_s: float = 0.1) -> None:
        self.table, self.teardown_s = table, teardown_s
        self.aborted: list[str] = []

    def abort(self, reason: str) -> None:
        self.aborted.append(reason)
        threading.Timer(self.teardown_s, self.table.writer_gone, args=(self,)).start()


def _block_major_table() -> ReservationTable:
    cache = allocate_kv_cache(3, 16, 4, 2, 8, dtype=torch.float32, device="cpu", block_major=True)
    return ReservationTable(cache, "127.0.0.1:1", "rx")


def test_release_waits_for_receives_into_the_blocks() -> None:
    table = _block_major_table()
    handle, ticket = _ticket(table, [3, 4, 5, 6], 2 * table.layout.block_bytes)
    writer = _Writer(table)
    assert table.begin_cache_writes(ticket, writer)
    threading.Timer(0.1, table.end_cache_writes, args=(ticket.handle_id,)).start()
    start = time.monotonic()
    table.release(handle)
    assert 0.08 <= time.monotonic() - start < RELEASE_WAIT_S, "release returned before the receives ended"
    assert writer.aborted == []
    assert not table.begin_cache_writes(ticket, writer), "a released reservation took new receives"


def test_release_cuts_off_a_writer_that_does_not_finish_and_waits_for_its_link() -> None:
    table = _block_major_table()
    handle, ticket = _ticket(table, [3, 4, 5, 6], 2 * table.layout.block_bytes)
    other, other_ticket = _ticket(table, [8, 9], table.layout.block_bytes)
    writer = _Writer(table, teardown_s=0.3)
    assert table.begin_cache_writes(ticket, writer) and table.begin_cache_writes(other_ticket, writer)
    start = time.monotonic()
    table.release(handle)
    took = time.monotonic() - start
    assert RELEASE_WAIT_S + 0.28 <= took < RELEASE_WAIT_S + 1, f"release took {took:.2f}s"
    assert len(writer.aborted) == 1 and handle.handle_id in writer.aborted[0]
    start = time.monotonic()
    table.release(other)  # the same link is down: nothing more to wait for
    assert time.monotonic() - start < 0.1 and len(writer.aborted) == 1
