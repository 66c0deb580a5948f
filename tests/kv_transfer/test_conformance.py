"""The KV transfer conformance suite: every transport must pass every test here.

Transports: loopback (in-process), gloo (real sockets and process groups, CPU), nccl (two GPUs).
"""

from __future__ import annotations

import dataclasses
import json
import random
import socket
import threading
import time

import pytest
import torch

from kv_transfer.base import RELEASE_WAIT_S, KVLayout, TransferState, gather_blocks
from kv_transfer.wire import CHECKSUMS, build_header, handle_to_kv_target

from .harness import PEER_SEED, Harness, PeerProcess, random_cache, target_of, wait_terminal

LAYERS, BLOCK_SIZE, HEADS, HEAD_DIM = 3, 4, 2, 8
NUM_BLOCKS = 32


def _caches(h: Harness, dtype=torch.float32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    return h.caches(LAYERS, NUM_BLOCKS, BLOCK_SIZE, HEADS, HEAD_DIM, dtype, seed)


def _assert_landed(src, dst, src_ids, dst_ids) -> None:
    got, want = dst[:, :, list(dst_ids)].cpu(), src[:, :, list(src_ids)].cpu()
    assert torch.equal(got, want), "destination blocks differ from the source blocks"
    untouched = sorted(set(range(dst.shape[2])) - set(dst_ids))
    assert not dst[:, :, untouched].cpu().any(), "blocks outside the reservation were written"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_round_trip_of_random_blocks(transport: Harness, dtype) -> None:
    rng = random.Random(7)
    src, dst = _caches(transport, dtype)
    receiver, sender = transport.receiver(dst), transport.sender()
    src_ids = rng.sample(range(NUM_BLOCKS), 6)
    dst_ids = rng.sample(range(NUM_BLOCKS), 6)
    handle = receiver.reserve("req-1", dst_ids, num_tokens=6 * BLOCK_SIZE - 1, deadline=time.time() + 30)
    assert receiver.poll(handle) is TransferState.BOOTSTRAPPING

    sender.send(handle, src_ids, src)
    wait_terminal(sender.poll, handle, 30)

    assert sender.poll(handle) is TransferState.SUCCESS, sender.error(handle)
    assert receiver.poll(handle) is TransferState.SUCCESS, receiver.error(handle)
    _assert_landed(src, dst, src_ids, dst_ids)


def test_multi_piece_send_in_any_order(transport: Harness) -> None:
    src, dst = _caches(transport, torch.bfloat16)
    receiver, sender = transport.receiver(dst), transport.sender()
    src_ids, dst_ids = [3, 9, 1, 30, 12, 5, 7], [20, 2, 11, 6, 0, 31, 14]
    handle = receiver.reserve("req-pieces", dst_ids, num_tokens=7 * BLOCK_SIZE, deadline=time.time() + 30)

    sender.send(handle, src_ids[2:5], src, dst_block_offset=2, last=False)
    sender.send(handle, src_ids[:2], src, dst_block_offset=0, last=False)
    wait_until = time.monotonic() + 30
    while receiver.poll(handle) is TransferState.BOOTSTRAPPING and time.monotonic() < wait_until:
        time.sleep(0.002)
    assert receiver.poll(handle) is TransferState.TRANSFERRING, "pieces landed but no done marker yet"
    sender.send(handle, src_ids[5:], src, dst_block_offset=5, last=True)
    wait_terminal(sender.poll, handle, 30)

    assert sender.poll(handle) is TransferState.SUCCESS, sender.error(handle)
    assert receiver.poll(handle) is TransferState.SUCCESS
    _assert_landed(src, dst, src_ids, dst_ids)


def test_bare_done_marker_after_pieces(transport: Harness) -> None:
    src, dst = _caches(transport)
    receiver, sender = transport.receiver(dst), transport.sender()
    handle = receiver.reserve("req-done", [4, 5], num_tokens=2 * BLOCK_SIZE, deadline=time.time() + 30)
    sender.send(handle, [0, 1], src, last=False)
    sender.send(handle, [], src, dst_block_offset=2, last=True)
    wait_terminal(sender.poll, handle, 30)
    assert sender.poll(handle) is TransferState.SUCCESS, sender.error(handle)
    _assert_landed(src, dst, [0, 1], [4, 5])


def test_done_marker_before_every_block_fails(transport: Harness) -> None:
    src, dst = _caches(transport)
    receiver, sender = transport.receiver(dst), transport.sender()
    handle = receiver.reserve("req-short", [4, 5, 6], num_tokens=3 * BLOCK_SIZE, deadline=time.time() + 30)
    sender.send(handle, [0, 1], src, last=True)
    wait_terminal(sender.poll, handle, 30)
    assert sender.poll(handle) is TransferState.FAILED
    assert "never arrived" in sender.error(handle)
    assert receiver.poll(handle) is TransferState.FAILED


def test_prefix_cached_blocks_are_skipped(transport: Harness) -> None:
    src, dst = _caches(transport)
    receiver, sender = transport.receiver(dst), transport.sender()
    # 5 prompt blocks, the first 2 already cached at the receiver: only 3 are reserved and sent.
    handle = receiver.reserve(
        "req-prefix", [8, 9, 10], num_tokens=5 * BLOCK_SIZE, deadline=time.time() + 30, first_block_index=2
    )
    sender.send(handle, [2, 3, 4], src)
    wait_terminal(sender.poll, handle, 30)
    assert sender.poll(handle) is TransferState.SUCCESS, sender.error(handle)
    _assert_landed(src, dst, [2, 3, 4], [8, 9, 10])


@pytest.mark.parametrize("message_bytes", [1000, 4096, 1 << 20])
def test_big_transfer_split_into_messages(transport: Harness, message_bytes: int) -> None:
    src, dst = _caches(transport)
    layout = KVLayout.of(src)
    receiver, sender = transport.receiver(dst), transport.sender(max_message_bytes=message_bytes)
    ids = list(range(16))
    handle = receiver.reserve("req-big", ids, num_tokens=16 * BLOCK_SIZE, deadline=time.time() + 30)
    header = build_header(handle, 0, gather_blocks(src, ids), 0, message_bytes, CHECKSUMS["none"])
    assert header.payload_bytes == 16 * layout.block_bytes
    assert header.num_messages == -(-header.payload_bytes // message_bytes)

    sender.send(handle, list(reversed(ids)), src)
    wait_terminal(sender.poll, handle, 60)
    assert sender.poll(handle) is TransferState.SUCCESS, sender.error(handle)
    _assert_landed(src, dst, list(reversed(ids)), ids)


@pytest.mark.parametrize("checksum", ["crc32", "sha256"])
def test_checksummed_transfer(transport: Harness, checksum: str) -> None:
    src, dst = _caches(transport)
    receiver, sender = transport.receiver(dst), transport.sender(checksum=checksum)
    handle = receiver.reserve("req-sum", [1, 2], num_tokens=2 * BLOCK_SIZE, deadline=time.time() + 30)
    sender.send(handle, [7, 8], src)
    wait_terminal(sender.poll, handle, 30)
    assert sender.poll(handle) is TransferState.SUCCESS, sender.error(handle)
    _assert_landed(src, dst, [7, 8], [1, 2])


def test_concurrent_transfers_from_two_senders(transport: Harness) -> None:
    src, dst = _caches(transport)
    receiver = transport.receiver(dst)
    senders = [transport.sender(), transport.sender()]
    handles = [
        receiver.reserve(
            f"req-{i}",
            [10 + 4 * i + k for k in range(4)],
            num_tokens=4 * BLOCK_SIZE,
            deadline=time.time() + 30,
        )
        for i in range(2)
    ]
    threads = [
        threading.Thread(target=s.send, args=(h, [4 * i + k for k in range(4)], src))
        for i, (s, h) in enumerate(zip(senders, handles, strict=True))
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for sender, handle in zip(senders, handles, strict=True):
        wait_terminal(sender.poll, handle, 30)
        assert sender.poll(handle) is TransferState.SUCCESS, sender.error(handle)
    _assert_landed(src, dst, list(range(8)), list(range(10, 18)))


def test_wrong_secret_is_rejected(transport: Harness) -> None:
    src, dst = _caches(transport)
    receiver = transport.receiver(dst)
    intruder = transport.sender(secret="not-the-secret")
    handle = receiver.reserve("req-auth", [3], num_tokens=BLOCK_SIZE, deadline=time.time() + 10)
    intruder.send(handle, [0], src)
    wait_terminal(intruder.poll, handle, 10)
    assert intruder.poll(handle) is TransferState.FAILED
    assert "authentication" in intruder.error(handle)
    assert receiver.poll(handle) is TransferState.BOOTSTRAPPING, (
        "an unauthenticated peer touched the reservation"
    )
    assert not dst.cpu().any()


def _unreserved(header, handle) -> None:
    header.block_ids[0] = next(b for b in range(NUM_BLOCKS) if b not in handle.block_ids)


# name -> (mutate(header, handle), expected error code, expected message fragment)
FORGERIES = {
    "unknown handle": (lambda h, _: setattr(h, "handle_id", "f" * 32), "NOT_FOUND", "unknown"),
    "wrong request id": (
        lambda h, _: setattr(h, "request_id", "someone-else"),
        "INVALID_ARGUMENT",
        "request id",
    ),
    "block id out of range": (
        lambda h, _: h.block_ids.__setitem__(0, NUM_BLOCKS + 5),
        "INVALID_ARGUMENT",
        "out of range",
    ),
    "negative block id": (lambda h, _: h.block_ids.__setitem__(1, -1), "INVALID_ARGUMENT", "out of range"),
    "unreserved block id": (_unreserved, "INVALID_ARGUMENT", "differ from the reserved"),
    "offset past reservation": (lambda h, _: setattr(h, "dst_block_offset", 2), "INVALID_ARGUMENT", "exceed"),
    "wrong dtype": (lambda h, _: setattr(h, "dtype", "float16"), "INVALID_ARGUMENT", "dtype"),
    "wrong layer count": (lambda h, _: setattr(h, "num_layers", LAYERS + 1), "INVALID_ARGUMENT", "layers"),
    "wrong shape": (lambda h, _: h.shape.__setitem__(4, HEADS * 2), "INVALID_ARGUMENT", "shape"),
    "wrong payload size": (
        lambda h, _: setattr(h, "payload_bytes", h.payload_bytes * 2),
        "INVALID_ARGUMENT",
        "payload",
    ),
    "message count": (
        lambda h, _: setattr(h, "num_messages", h.num_messages + 3),
        "INVALID_ARGUMENT",
        "messages",
    ),
    "piece out of order": (lambda h, _: setattr(h, "piece_index", 4), "INVALID_ARGUMENT", "out of order"),
    "malformed checksum": (lambda h, _: setattr(h, "checksum", b"abc"), "INVALID_ARGUMENT", "checksum"),
}


@pytest.mark.parametrize("forgery", list(FORGERIES))
def test_forged_descriptor_is_rejected(transport: Harness, forgery: str) -> None:
    src, dst = _caches(transport)
    receiver = transport.receiver(dst)
    handle = receiver.reserve("req-forged", [5, 6, 7], num_tokens=3 * BLOCK_SIZE, deadline=time.time() + 30)
    mutate, code, fragment = FORGERIES[forgery]
    header = build_header(handle, 0, gather_blocks(src, [0, 1, 2]), 0, 4096, CHECKSUMS["none"])
    mutate(header, handle)

    error = transport.deliver_header(receiver, header)

    assert error is not None, f"forged header ({forgery}) was accepted"
    assert error.code == code, error
    assert fragment in error.message, error.message
    assert not dst.cpu().any(), "a rejected header wrote into the cache"
    if code != "NOT_FOUND":  # the reservation it aimed at failed loudly instead of waiting for its deadline
        assert receiver.poll(handle) is TransferState.FAILED
        assert fragment in receiver.error(handle)


def test_receiver_fails_at_deadline_when_no_sender_comes(transport: Harness) -> None:
    _, dst = _caches(transport)
    receiver = transport.receiver(dst)
    handle = receiver.reserve("req-lonely", [0, 1], num_tokens=2 * BLOCK_SIZE, deadline=time.time() + 0.5)
    assert receiver.poll(handle) is TransferState.BOOTSTRAPPING
    elapsed = wait_terminal(receiver.poll, handle, 5)
    assert receiver.poll(handle) is TransferState.FAILED
    assert "deadline" in receiver.error(handle)
    assert 0.3 < elapsed < 2.0
    receiver.release(handle)
    with pytest.raises(KeyError):
        receiver.poll(handle)


def test_sender_to_missing_receiver_fails(transport: Harness) -> None:
    src, dst = _caches(transport)
    receiver = transport.receiver(dst)
    handle = receiver.reserve("req-gone", [0], num_tokens=BLOCK_SIZE, deadline=time.time() + 5)
    receiver.close()
    sender = transport.sender()
    sender.send(handle, [0], src)
    assert wait_terminal(sender.poll, handle, 10) < 5.5
    assert sender.poll(handle) is TransferState.FAILED


def test_silent_receiver_fails_within_deadline(gloo_transport: Harness) -> None:
    """A peer that accepts the connection and never answers: FAILED at the deadline, not a hang."""
    src, dst = _caches(gloo_transport)
    real = gloo_transport.receiver(dst)
    with socket.create_server(("127.0.0.1", 0)) as silent:
        handle = real.reserve("req-silent", [0], num_tokens=BLOCK_SIZE, deadline=time.time() + 1.0)
        handle = dataclasses.replace(handle, address=f"127.0.0.1:{silent.getsockname()[1]}")
        sender = gloo_transport.sender()
        sender.send(handle, [0], src)
        elapsed = wait_terminal(sender.poll, handle, 5)
    assert sender.poll(handle) is TransferState.FAILED
    assert elapsed < 2.0
    assert "deadline" in sender.error(handle) or "timed out" in sender.error(handle)


def test_sender_killed_mid_transfer(transport: Harness) -> None:
    if not transport.is_network:
        pytest.skip("an in-process transport has no peer process to kill")
    src, dst = _caches(transport)
    receiver = transport.receiver(dst)
    ids = list(range(8))
    handle = receiver.reserve("peer-request", ids, num_tokens=8 * BLOCK_SIZE, deadline=time.time() + 60)
    peer = PeerProcess(
        "sender-half", "--backend", transport.name, "--device", str(transport.src_device), "--secret", "conformance-secret",
        "--target", handle_to_kv_target(handle).SerializeToString().hex(), "--message-bytes", "2048",
    )  # fmt: skip
    try:
        progress = peer.read_json()
        assert 0 < progress["sent"] < progress["of"]
        accepted_by = time.monotonic() + 10  # the receiver validates the header beside the bytes
        while receiver.poll(handle) is TransferState.BOOTSTRAPPING and time.monotonic() < accepted_by:
            time.sleep(0.002)
        assert receiver.poll(handle) is TransferState.TRANSFERRING
        peer.kill()
        elapsed = wait_terminal(receiver.poll, handle, 20)
    finally:
        peer.kill()
    assert receiver.poll(handle) is TransferState.FAILED
    assert elapsed < 10, "a dead sender must fail the transfer long before its 60 s deadline"
    # 8 blocks of 1536 bytes in 2048-byte messages, 3 of 6 sent: at most blocks 0-3 are complete.
    # Only complete blocks of the sender's own bytes may land, and nothing outside the reservation.
    got = dst.cpu()
    sent = random_cache(LAYERS, 8, BLOCK_SIZE, HEADS, HEAD_DIM, torch.float32, "cpu", seed=PEER_SEED)
    written = [block for block in ids if got[:, :, block].any()]
    assert written == list(range(len(written))) and len(written) <= 4, f"blocks {written} written from half a piece"
    for block in written:
        assert torch.equal(got[:, :, block], sent[:, :, block]), "a landed block differs from what was sent"
    assert not got[:, :, len(ids) :].any(), "blocks outside the reservation were written"
    receiver.release(handle)
    assert receiver.num_reservations == 0


def test_receiver_killed_mid_transfer(transport: Harness) -> None:
    if not transport.is_network:
        pytest.skip("an in-process transport has no peer process to kill")
    layout = {
        "num_layers": LAYERS,
        "num_blocks": NUM_BLOCKS,
        "block_size": BLOCK_SIZE,
        "num_kv_heads": HEADS,
        "head_dim": HEAD_DIM,
        "dtype": "float32",
    }
    peer = PeerProcess(
        "receiver", "--backend", transport.name, "--device", str(transport.dst_device), "--secret", "conformance-secret",
        "--layout", json.dumps(layout), "--num-blocks", "6", "--deadline", "60",
    )  # fmt: skip
    src, _ = _caches(transport)
    sender = transport.sender()
    try:
        handle = target_of(peer.read_json())
        sender.send(handle, [0, 1, 2], src, dst_block_offset=0, last=False)
        deadline = time.monotonic() + 30
        while sender.poll(handle) is TransferState.BOOTSTRAPPING and time.monotonic() < deadline:
            time.sleep(0.005)
        assert sender.poll(handle) is TransferState.TRANSFERRING, sender.error(handle)
        peer.kill()
        sender.send(handle, [3, 4, 5], src, dst_block_offset=3, last=True)
        elapsed = wait_terminal(sender.poll, handle, 20)
    finally:
        peer.kill()
    assert sender.poll(handle) is TransferState.FAILED
    assert elapsed < 10, "a dead receiver must fail the transfer long before its 60 s deadline"


def _skip_unless_in_place(transport: Harness) -> None:
    if not (transport.is_network and transport.block_major):
        pytest.skip("receiving in place needs a network transport and a block-major cache")


def test_block_major_receiver_takes_later_messages_in_place(transport: Harness, monkeypatch) -> None:
    """Messages after the first go straight into consecutive reserved blocks (no staging, no landing
    copy); where the reserved blocks are not consecutive, those messages are staged and landed."""
    _skip_unless_in_place(transport)
    from kv_transfer.reservations import ReservationTable

    in_place: list[int] = []
    targets = ReservationTable.cache_targets

    def counting(table, ticket):
        found = targets(table, ticket)
        in_place.append(sum(target is not None for target in found[1:]))
        return found

    monkeypatch.setattr(ReservationTable, "cache_targets", counting)
    src, dst = _caches(transport)
    receiver = transport.receiver(dst)
    sender = transport.sender(max_message_bytes=2 * KVLayout.of(src).block_bytes)
    cases = {"consecutive": ([4, 5, 6, 7, 8, 9, 10, 11], 3), "two runs": ([20, 21, 22, 23, 12, 13, 2, 30], 2)}
    for request_id, (dst_ids, expected) in cases.items():
        handle = receiver.reserve(request_id, dst_ids, num_tokens=8 * BLOCK_SIZE, deadline=time.time() + 30)
        src_ids = list(range(8))
        sender.send(handle, src_ids, src)
        wait_terminal(receiver.poll, handle, 30)
        assert receiver.poll(handle) is TransferState.SUCCESS, receiver.error(handle)
        assert torch.equal(dst[:, :, dst_ids].cpu(), src[:, :, src_ids].cpu()), request_id
        assert in_place[-1] == expected, (request_id, in_place)
        receiver.release(handle)


def test_release_while_bytes_arrive_in_place_cuts_the_sender_off(transport: Harness) -> None:
    """A block-major receiver takes a piece's later messages straight into the reserved blocks. Released
    while a stalled (live) sender still owes some of them, it waits RELEASE_WAIT_S for them, then cuts
    that sender off and returns once its link is down (NCCL: at once; a gloo receive gives up only at
    the reservation's deadline): after that nothing the sender sends reaches the cache, and the
    receiver serves other senders."""
    _skip_unless_in_place(transport)
    src, dst = _caches(transport)
    receiver = transport.receiver(dst)
    ids = list(range(8))
    window = 60 if transport.name == "nccl" else 8  # gloo: the release lasts till the deadline
    handle = receiver.reserve("peer-request", ids, num_tokens=8 * BLOCK_SIZE, deadline=time.time() + window)
    block_bytes = handle.layout.block_bytes
    peer = PeerProcess(
        "sender-half", "--backend", transport.name, "--device", str(transport.src_device), "--secret", "conformance-secret",
        "--target", handle_to_kv_target(handle).SerializeToString().hex(), "--message-bytes", str(block_bytes),
    )  # fmt: skip
    sent = random_cache(LAYERS, 8, BLOCK_SIZE, HEADS, HEAD_DIM, torch.float32, "cpu", seed=PEER_SEED)
    try:
        assert peer.read_json() == {"sent": 4, "of": 8}  # one block per message; then it stalls
        arrived_by = time.monotonic() + 10
        while not torch.equal(dst[:, :, :4].cpu(), sent[:, :, :4]) and time.monotonic() < arrived_by:
            time.sleep(0.005)
        assert torch.equal(dst[:, :, :4].cpu(), sent[:, :, :4]), "the sent blocks did not arrive"
        assert receiver.poll(handle) is TransferState.TRANSFERRING
        start = time.monotonic()
        receiver.release(handle)
        took = time.monotonic() - start
        at_release = dst.cpu().clone()
        peer.tell("rest")  # the sender wakes up and sends the other half: none of it may land now
        time.sleep(1.0)
        after = dst.cpu()
    finally:
        peer.kill()
    longest = RELEASE_WAIT_S + 2 if transport.name == "nccl" else window
    assert RELEASE_WAIT_S * 0.9 <= took < longest, f"release took {took:.2f}s"
    assert receiver.num_reservations == 0
    changed = [b for b in range(NUM_BLOCKS) if not torch.equal(after[:, :, b], at_release[:, :, b])]
    assert changed == [], f"blocks {changed} were written after release returned"
    assert not after[:, :, len(ids) :].any(), "blocks outside the reservation were written"
    # The receiver still serves: a fresh sender's transfer lands in other blocks.
    other = receiver.reserve("after", [8, 9, 10], num_tokens=3 * BLOCK_SIZE, deadline=time.time() + 30)
    sender = transport.sender()
    sender.send(other, [3, 4, 5], src)
    wait_terminal(receiver.poll, other, 30)
    assert receiver.poll(other) is TransferState.SUCCESS, receiver.error(other)
    assert torch.equal(dst[:, :, [8, 9, 10]].cpu(), src[:, :, [3, 4, 5]].cpu())


def test_release_mid_transfer_stops_writes(transport: Harness) -> None:
    src, dst = _caches(transport)
    receiver, sender = transport.receiver(dst), transport.sender()
    handle = receiver.reserve(
        "req-release", [0, 1, 2, 3], num_tokens=4 * BLOCK_SIZE, deadline=time.time() + 30
    )
    receiver.release(handle)
    sender.send(handle, [4, 5, 6, 7], src)
    wait_terminal(sender.poll, handle, 30)
    assert sender.poll(handle) is TransferState.FAILED
    assert "unknown or released" in sender.error(handle)
    assert not dst.cpu().any()


def test_refused_piece_keeps_the_link_usable(transport: Harness) -> None:
    """A refused piece's bytes are drained, so the next transfer on the same link still lands."""
    src, dst = _caches(transport)
    receiver, sender = transport.receiver(dst), transport.sender(max_message_bytes=1000)
    gone = receiver.reserve("req-gone", [0, 1], num_tokens=2 * BLOCK_SIZE, deadline=time.time() + 30)
    kept = receiver.reserve("req-kept", [2, 3], num_tokens=2 * BLOCK_SIZE, deadline=time.time() + 30)
    warmup = receiver.reserve("req-warm", [4], num_tokens=BLOCK_SIZE, deadline=time.time() + 30)
    sender.send(warmup, [9], src)  # connects; the pieces below are posted straight from send()
    wait_terminal(sender.poll, warmup, 30)
    receiver.release(gone)

    sender.send(gone, [5, 6], src)
    sender.send(kept, [7, 8], src)
    wait_terminal(sender.poll, kept, 30)

    assert sender.poll(gone) is TransferState.FAILED and "unknown or released" in sender.error(gone)
    assert sender.poll(kept) is TransferState.SUCCESS, sender.error(kept)
    _assert_landed(src, dst, [9, 7, 8], [4, 2, 3])


def test_many_transfers_back_to_back(transport: Harness) -> None:
    src, dst = _caches(transport)
    receiver, sender = transport.receiver(dst), transport.sender(max_message_bytes=2048)
    for round_ in range(4):
        dst_ids = [(round_ * 3 + k) % NUM_BLOCKS for k in range(3)]
        handle = receiver.reserve(
            f"req-{round_}", dst_ids, num_tokens=3 * BLOCK_SIZE, deadline=time.time() + 30
        )
        src_ids = [20 - round_, 25, 3 + round_]
        sender.send(handle, src_ids, src)
        wait_terminal(sender.poll, handle, 30)
        assert sender.poll(handle) is TransferState.SUCCESS, sender.error(handle)
        assert receiver.poll(handle) is TransferState.SUCCESS
        assert torch.equal(dst[:, :, dst_ids].cpu(), src[:, :, src_ids].cpu())


def test_sender_wait_blocks_until_the_receiver_answers(gloo_transport: Harness) -> None:
    src, dst = _caches(gloo_transport)
    receiver, sender = gloo_transport.receiver(dst), gloo_transport.sender()
    handle = receiver.reserve("req-wait", [1, 2], num_tokens=2 * BLOCK_SIZE, deadline=time.time() + 30)
    sender.send(handle, [3, 4], src)
    assert sender.wait(handle, timeout=30) is TransferState.SUCCESS
    assert receiver.poll(handle) is TransferState.SUCCESS
    _assert_landed(src, dst, [3, 4], [1, 2])


def test_receiver_wait_wakes_when_the_transfer_ends(transport: Harness) -> None:
    # Every receiver blocks in wait() until the transfer ends (the decode worker waits for its KV
    # this way), returns at its timeout, and wakes at the reservation's deadline when no sender comes.
    src, dst = _caches(transport)
    receiver, sender = transport.receiver(dst), transport.sender()
    handle = receiver.reserve("req-wait-any", [1, 2], num_tokens=2 * BLOCK_SIZE, deadline=time.time() + 30)
    sender.send(handle, [3, 4], src)
    assert receiver.wait(handle, timeout=30) is TransferState.SUCCESS
    _assert_landed(src, dst, [3, 4], [1, 2])
    lonely = receiver.reserve("req-wait-none", [5], num_tokens=BLOCK_SIZE, deadline=time.time() + 0.3)
    start = time.monotonic()
    assert receiver.wait(lonely, timeout=0.05) is TransferState.BOOTSTRAPPING  # timed out first
    assert receiver.wait(lonely, timeout=5) is TransferState.FAILED  # then the deadline
    assert time.monotonic() - start < 1.5
