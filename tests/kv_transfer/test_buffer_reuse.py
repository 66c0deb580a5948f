"""Staging buffers are reused across pieces: every transport must still land exactly the bytes sent.

A sender keeps a few buffers and a receiver connection keeps one, grown on demand (see
kv_transfer/staging.py). These tests change piece sizes, post pieces faster than they leave, and cut a
smaller piece off after a larger one, checking that no byte of an earlier piece lands anywhere.
"""

from __future__ import annotations

import time

import pytest
import torch

from kv_transfer.base import TransferState
from kv_transfer.wire import handle_to_kv_target

from .harness import PEER_SEED, Harness, PeerProcess, random_cache, wait_terminal

LAYERS, BLOCK_SIZE, HEADS, HEAD_DIM = 3, 4, 2, 8
NUM_BLOCKS = 48
ONE_BLOCK = LAYERS * 2 * BLOCK_SIZE * HEADS * HEAD_DIM * 4  # float32 bytes of one block, every layer


def _caches(h: Harness) -> tuple[torch.Tensor, torch.Tensor]:
    return h.caches(LAYERS, NUM_BLOCKS, BLOCK_SIZE, HEADS, HEAD_DIM, seed=3)


def _check(src, dst, moved: dict[int, int]) -> None:
    """``dst`` holds ``src``'s block ``moved[d]`` at every ``d`` in ``moved``, and zeros elsewhere."""
    dst, src = dst.cpu(), src.cpu()
    for d, s in moved.items():
        assert torch.equal(dst[:, :, d], src[:, :, s]), f"destination block {d} is not source block {s}"
    untouched = sorted(set(range(NUM_BLOCKS)) - set(moved))
    assert not dst[:, :, untouched].any(), "blocks outside every reservation were written"


def test_pieces_of_changing_sizes_land_exactly(transport: Harness) -> None:
    src, dst = _caches(transport)
    receiver = transport.receiver(dst)
    sender = transport.sender(max_message_bytes=2 * ONE_BLOCK + 100)  # not a whole number of blocks
    moved: dict[int, int] = {}
    # Large, then smaller (the buffers hold the larger piece's bytes behind it), then larger again.
    plans = [
        (list(range(0, 12)), list(range(20, 32))),
        (list(range(14, 17)), [40, 33, 35]),
        ([30, 2, 19, 7, 44, 11, 25], [0, 9, 3, 17, 5, 12, 8]),  # scattered ids
        (
            list(range(31, 47)),
            list(range(1, 2)) + list(range(41, 48)) + list(range(13, 17)) + [18, 19, 36, 37],
        ),
        ([5], [39]),
    ]
    for round_, (src_ids, dst_ids) in enumerate(plans):
        handle = receiver.reserve(f"req-{round_}", dst_ids, len(dst_ids) * BLOCK_SIZE, time.time() + 30)
        sender.send(handle, src_ids, src)
        wait_terminal(sender.poll, handle, 30)
        assert sender.poll(handle) is TransferState.SUCCESS, sender.error(handle)
        assert receiver.poll(handle) is TransferState.SUCCESS, receiver.error(handle)
        moved.update(zip(dst_ids, src_ids, strict=True))
        _check(src, dst, moved)
    if transport.is_network:  # pieces one after another share the pooled buffers
        assert len(sender._pool._buffers) == 1 and len(receiver._staging._buffers) == 1


def test_pieces_posted_back_to_back_land_exactly(transport: Harness) -> None:
    """Pieces posted faster than they leave: each still goes out of a buffer nothing else writes."""
    src, dst = _caches(transport)
    receiver = transport.receiver(dst)
    sender = transport.sender(max_message_bytes=ONE_BLOCK)
    warmup = receiver.reserve("req-warm", [47], BLOCK_SIZE, time.time() + 30)
    sender.send(warmup, [47], src)  # connects: the pieces below take the direct path
    wait_terminal(sender.poll, warmup, 30)
    src_ids = [3, 4, 5, 20, 21, 9, 8, 7, 30, 31, 32, 33]
    dst_ids = list(range(12))
    handle = receiver.reserve("req-burst", dst_ids, len(dst_ids) * BLOCK_SIZE, time.time() + 30)
    for offset in range(0, 12, 2):  # six pieces, none waiting for the one before
        sender.send(handle, src_ids[offset : offset + 2], src, dst_block_offset=offset, last=offset == 10)
    wait_terminal(sender.poll, handle, 30)
    assert sender.poll(handle) is TransferState.SUCCESS, sender.error(handle)
    assert receiver.poll(handle) is TransferState.SUCCESS
    _check(src, dst, {47: 47, **dict(zip(dst_ids, src_ids, strict=True))})
    if transport.is_network:
        assert len(sender._pool._buffers) <= 2


def test_half_sent_piece_after_a_larger_one_lands_no_stale_bytes(transport: Harness) -> None:
    """A larger piece fills the receiver's staging buffer; a smaller one is cut off half-way behind it.

    Only whole blocks of the smaller piece's own bytes may land: landing a block whose bytes did not
    all arrive would write the larger piece's leftovers into the cache.
    """
    if not transport.is_network:
        pytest.skip("an in-process transport has no peer process to kill")
    _, dst = _caches(transport)
    receiver = transport.receiver(dst)
    full_ids, half_ids = list(range(20, 28)), list(range(4, 8))
    full = receiver.reserve("peer-full", full_ids, len(full_ids) * BLOCK_SIZE, time.time() + 60)
    half = receiver.reserve("peer-request", half_ids, len(half_ids) * BLOCK_SIZE, time.time() + 60)
    target = lambda h: handle_to_kv_target(h).SerializeToString().hex()  # noqa: E731
    peer = PeerProcess(
        "sender-full-then-half", "--backend", transport.name, "--device", str(transport.src_device),
        "--secret", "conformance-secret", "--target", target(half), "--full-target", target(full),
        "--message-bytes", str(ONE_BLOCK * 3 // 2),
    )  # fmt: skip
    try:
        progress = peer.read_json()
        assert 0 < progress["sent"] < progress["of"]
        accepted_by = time.monotonic() + 10
        while receiver.poll(half) is TransferState.BOOTSTRAPPING and time.monotonic() < accepted_by:
            time.sleep(0.002)
        assert receiver.poll(half) is TransferState.TRANSFERRING
        peer.kill()
        wait_terminal(receiver.poll, half, 20)
    finally:
        peer.kill()
    assert receiver.poll(full) is TransferState.SUCCESS, receiver.error(full)
    assert receiver.poll(half) is TransferState.FAILED
    got = dst.cpu()
    full_sent = random_cache(LAYERS, 8, BLOCK_SIZE, HEADS, HEAD_DIM, torch.float32, "cpu", seed=PEER_SEED + 1)
    half_sent = random_cache(LAYERS, 4, BLOCK_SIZE, HEADS, HEAD_DIM, torch.float32, "cpu", seed=PEER_SEED)
    assert torch.equal(got[:, :, full_ids], full_sent)
    # 4 blocks in messages of 1.5 blocks, 1 of 3 sent: block 0 is whole, block 1 half (its other half
    # in staging is the larger piece's bytes), blocks 2 and 3 missing.
    written = [i for i, block in enumerate(half_ids) if got[:, :, block].any()]
    assert written in ([], [0]), f"blocks {written} written from half a piece"
    for i in written:
        assert torch.equal(got[:, :, half_ids[i]], half_sent[:, :, i])
    others = sorted(set(range(NUM_BLOCKS)) - set(full_ids) - set(half_ids))
    assert not got[:, :, others].any(), "blocks outside the reservations were written"
