"""Unit tests of the staging buffers, the send / land schedules, and the sender's host path."""

from __future__ import annotations

import time

import pytest
import torch

from kv_transfer.base import TransferState
from kv_transfer.blocks import BlockMover, blocks_covered
from kv_transfer.call_count import CallCounter
from kv_transfer.dist_receiver import DistKVReceiver
from kv_transfer.dist_sender import DistKVSender
from kv_transfer.sender_link import SenderConnection
from kv_transfer.staging import Staging, StagingPool, landings, message_blocks

from .harness import random_cache, wait_terminal

ONE_BLOCK = 4096


@pytest.mark.parametrize(
    ("blocks", "message_bytes"),
    [(128, 40 * ONE_BLOCK), (128, 32 * ONE_BLOCK), (3, ONE_BLOCK), (5, 5 * ONE_BLOCK), (7, 3 * ONE_BLOCK)],
)
def test_sender_messages_carry_whole_blocks_once_each(blocks: int, message_bytes: int) -> None:
    payload = blocks * ONE_BLOCK
    plan = message_blocks(payload, message_bytes, ONE_BLOCK, blocks)
    assert len(plan) == -(-payload // message_bytes)
    assert [lo for lo, _ in plan] == [0] + [hi for _, hi in plan[:-1]], "messages tile the blocks"
    assert plan[-1][1] == blocks
    for tag, (lo, hi) in enumerate(plan):  # a message's bytes are exactly its blocks' bytes
        assert (lo * ONE_BLOCK, hi * ONE_BLOCK) == (tag * message_bytes, min((tag + 1) * message_bytes, payload))


@pytest.mark.parametrize(("blocks", "message_bytes"), [(32, 10 * ONE_BLOCK), (3, 1000), (4, 3 * ONE_BLOCK + 7)])
def test_landings_land_each_block_once_when_complete(blocks: int, message_bytes: int) -> None:
    """Whatever framing a header claims, a block lands only once every byte of it arrived."""
    payload = blocks * ONE_BLOCK
    plan = landings(payload, message_bytes, ONE_BLOCK, blocks)
    assert len(plan) == -(-payload // message_bytes)
    covered = []
    for index, step in enumerate(plan):
        if step is None:
            continue
        lo, hi = step
        end = min((index + 1) * message_bytes, payload)
        assert hi == blocks_covered(end, ONE_BLOCK, blocks), "only blocks every byte of which arrived"
        covered += range(lo, hi)
    assert covered == list(range(blocks))


def test_staging_reuses_its_buffer_and_views_and_grows_on_demand() -> None:
    staging = Staging(torch.device("cpu"))
    big = staging.views(10_000, 4_000, 3)
    assert [m.numel() for m in big.messages] == [4_000, 4_000, 2_000]
    assert torch.equal(torch.cat(big.messages), big.flat) and big.flat.numel() == 10_000
    capacity, pointer = staging.capacity, big.flat.data_ptr()
    assert capacity >= 10_000

    small = staging.views(3_000, 1_000, 3)  # a smaller piece: same memory, its own exact views
    assert small.flat.data_ptr() == pointer and small.flat.numel() == 3_000
    assert staging.capacity == capacity
    assert staging.views(10_000, 4_000, 3) is big, "views of a size seen before are reused"

    larger = staging.views(capacity + 1, capacity + 1, 1)
    assert staging.capacity >= capacity + 1 and larger.flat.numel() == capacity + 1
    assert staging.views(3_000, 1_000, 3) is not small, "growing drops the views of the old buffer"


def test_piece_views_typed_slabs_are_views_of_the_bytes() -> None:
    views = Staging(torch.device("cpu")).views(3 * 2 * 2 * 4 * 8 * 2, 384, 4)
    shape = (3, 2, 2, 4, 1, 8)  # [blocks, layers, K/V, block_size, heads, head_dim]
    piece = views.piece(shape, torch.bfloat16)
    piece.copy_(torch.randn(shape).to(torch.bfloat16))
    slab = views.slab(shape, torch.bfloat16, torch.int64, 1, 2)
    assert slab.shape == (1, 2, 2, 8) and slab.dtype == torch.int64  # a K or V row: 64 bytes = 8 words
    assert slab.data_ptr() == piece[1].data_ptr()
    assert torch.equal(slab.view(torch.bfloat16).view(1, 2, 2, 4, 1, 8), piece[1:2])
    assert views.slab(shape, torch.bfloat16, torch.int64, 1, 2) is slab


class _FakeWork:
    """A send's work as the pool sees it: done or not."""

    def __init__(self) -> None:
        self.done = False

    def is_completed(self) -> bool:
        return self.done


def test_pool_hands_a_buffer_out_only_once_its_last_send_completed() -> None:
    pool = StagingPool(torch.device("cpu"), size=2)
    first = pool.acquire()
    assert pool.acquire() is not first, "a taken buffer whose sends are not posted is not free"
    second = pool._buffers[1]
    work_one, work_two = _FakeWork(), _FakeWork()
    first.lend(work_one)
    second.lend(work_two)
    transient = pool.acquire()  # both pooled buffers still being sent from
    assert transient is not first and transient is not second and len(pool._buffers) == 2

    work_two.done = True  # seen complete by the pool itself
    assert pool.acquire() is second
    second.lend(_FakeWork())
    first.sends_completed(_FakeWork())  # an older send's completion does not free a lent-again buffer
    assert not first.try_take()
    first.sends_completed(work_one)  # the link thread saw the last send complete
    assert pool.acquire() is first

    pool.discard(first)
    assert first not in pool._buffers


def test_receiver_side_buffer_is_free_once_given_back() -> None:
    pool = StagingPool(torch.device("cpu"), size=1)
    taken = pool.acquire()
    assert pool.acquire() is not taken, "a piece is still being received into it"
    taken.give_back()
    assert pool.acquire() is taken


def _connected_pair(dst: torch.Tensor, **options):
    receiver = DistKVReceiver(dst, backend="gloo", secret="s", group_timeout=20.0)
    sender = DistKVSender(backend="gloo", device="cpu", secret="s", group_timeout=20.0, **options)
    return receiver, sender


def _transfer(receiver, sender, src, src_ids, dst_ids, block_size: int) -> None:
    handle = receiver.reserve("r", dst_ids, len(dst_ids) * block_size, time.time() + 30)
    sender.send(handle, src_ids, src)
    wait_terminal(sender.poll, handle, 30)
    assert sender.poll(handle) is TransferState.SUCCESS, sender.error(handle)
    assert receiver.poll(handle) is TransferState.SUCCESS


@pytest.mark.parametrize("block_major", [False, True], ids=["layer-major", "block-major"])
def test_header_leaves_before_the_piece_is_gathered(monkeypatch, block_major: bool) -> None:
    src = random_cache(4, 16, 4, 2, 8, torch.float32, "cpu", block_major=block_major)
    dst = torch.zeros_like(src)
    receiver, sender = _connected_pair(dst, max_message_bytes=4096)  # 2 blocks of 4 layers
    try:
        _transfer(receiver, sender, src, [0], [0], 4)  # connects: later pieces take the direct path
        order: list[str] = []
        real_header, real_post = SenderConnection.send_header, SenderConnection.post_message
        real_gather = BlockMover.gather

        def send_header(connection, *args):
            order.append("header")
            return real_header(connection, *args)

        def post_message(connection, view, tag):
            from_cache = view.untyped_storage().data_ptr() == src.untyped_storage().data_ptr()
            order.append(f"send {tag}" + (" from the cache" if from_cache else ""))
            return real_post(connection, view, tag)

        def gather(mover, words, slab, lo, hi):
            order.append(f"gather {lo}-{hi}")
            return real_gather(mover, words, slab, lo, hi)

        monkeypatch.setattr(SenderConnection, "send_header", send_header)
        monkeypatch.setattr(SenderConnection, "post_message", post_message)
        monkeypatch.setattr(BlockMover, "gather", gather)
        _transfer(receiver, sender, src, [4, 5, 6, 7], [8, 9, 10, 11], 4)
        if block_major:  # consecutive blocks of a block-major cache: no copy at all
            assert order == ["header", "send 0 from the cache", "send 1 from the cache"]
        else:  # 4 blocks in messages of 2: gather the first message's blocks, send it, then the next
            assert order == ["header", "gather 0-2", "send 0", "gather 2-4", "send 1"]
        assert torch.equal(dst[:, :, 8:12], src[:, :, 4:8])
        order.clear()
        _transfer(receiver, sender, src, [1, 2, 9, 3], [12, 13, 14, 15], 4)  # the second message: no run
        gathered = ["gather 2-4", "send 1"]
        first = ["send 0 from the cache"] if block_major else ["gather 0-2", "send 0"]
        assert order == ["header", *first, *gathered]
        assert torch.equal(dst[:, :, 12:16], src[:, :, [1, 2, 9, 3]])
    finally:
        sender.close()
        receiver.close()


def test_release_returns_only_once_nothing_reads_the_source_blocks() -> None:
    """Sends straight from the cache read it after ``send`` returned; ``release`` waits for them, so
    the caller may overwrite the blocks right after it without the receiver seeing the new bytes."""
    src = random_cache(4, 64, 4, 2, 8, torch.float32, "cpu", block_major=True)
    original = src.clone()
    dst = torch.zeros_like(src)
    receiver, sender = _connected_pair(dst, max_message_bytes=8192)
    try:
        _transfer(receiver, sender, src, [0], [0], 4)  # connects: the next piece goes straight out
        for attempt in range(5):
            ids = list(range(8, 40))
            handle = receiver.reserve(f"r{attempt}", list(range(32)), 32 * 4, time.time() + 30)
            sender.send(handle, ids, src)
            sender.release(handle)
            src[:, :, ids] = -1.0  # what a new owner of the blocks would write
            wait_terminal(receiver.poll, handle, 30)
            assert receiver.poll(handle) is TransferState.SUCCESS, receiver.error(handle)
            assert torch.equal(dst[:, :, :32], original[:, :, ids]), "bytes written after release were sent"
            receiver.release(handle)
            src.copy_(original)
    finally:
        sender.close()
        receiver.close()


@pytest.mark.parametrize(
    ("pattern", "block_major", "limit"),
    [("run", False, 3), ("scattered", False, 4), ("run", True, 3), ("scattered", True, 4)],
)
def test_torch_calls_before_the_first_send_are_few(pattern: str, block_major: bool, limit: int) -> None:
    """The host path is the transfer's cost: count the calls into torch before bytes can move."""
    layers, blocks_, block_size = 8, 32, 4
    src = random_cache(layers, blocks_, block_size, 2, 8, torch.bfloat16, "cpu", block_major=block_major)
    dst = torch.zeros_like(src)
    one_block = layers * 2 * block_size * 2 * 8 * 2
    receiver, sender = _connected_pair(dst, max_message_bytes=6 * one_block)
    ids = list(range(8, 24)) if pattern == "run" else [3, 17, 5, 30, 11, 0, 25, 8, 19, 2, 28, 14, 6, 21, 9, 1]
    try:
        for _ in range(2):  # connect, and fill the staging buffer's views for this size
            _transfer(receiver, sender, src, ids, list(range(16)), block_size)
        handle = receiver.reserve("counted", list(range(16, 32)), 16 * block_size, time.time() + 30)
        counter = CallCounter().start()
        try:
            sender.send(handle, ids, src)
        finally:
            counter.stop()
        wait_terminal(sender.poll, handle, 30)
        assert sender.poll(handle) is TransferState.SUCCESS, sender.error(handle)
        assert torch.equal(dst[:, :, 16:32], src[:, :, ids])
        before_first_send = counter.first()
        assert before_first_send is not None, counter.calls
        # A metadata read, then for a run on a layer-major cache one slice of it and one copy; on a
        # block-major one the slice of its rows and a flat view, no copy; scattered: index upload, gather.
        assert before_first_send <= limit, counter.calls[: before_first_send + 1]
        assert "torch.empty" not in counter.calls, "a piece of a size seen before allocates nothing"
        assert counter.calls.count("_distributed_c10d.send") == 3  # 16 blocks in messages of 6
    finally:
        sender.close()
        receiver.close()
