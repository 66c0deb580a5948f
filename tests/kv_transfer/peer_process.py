"""A real peer process for the transfer tests, killed by the test mid-transfer.

Run as ``python -m tests.kv_transfer.peer_process MODE ...`` from the repository root. It prints one
JSON line, tagged ``REPORT_TAG``, when it reached the point the test waits for, then sleeps until
killed. The tag keeps its reports apart from what libraries print on the same stream (NCCL prints
its version there when ``NCCL_DEBUG`` is set).

Modes:
- ``receiver``: owns a cache, reserves blocks, prints ``{"target": <KVTarget hex>}``.
- ``sender-half``: sends the header of a piece covering every reserved block of ``--target`` and only
  the first half of its messages, then prints ``{"sent": <messages>, "of": <total>}``; on reading the
  line ``rest`` it sends the other half too (its sends may then fail: the receiver may have cut it off).
- ``sender-full-then-half``: first sends every reserved block of ``--full-target`` (from a cache of
  seed ``PEER_SEED + 1``) and its done marker, waiting for both answers, then does what
  ``sender-half`` does for ``--target`` on the same connection: the receiver's staging buffer then
  holds the larger piece's bytes behind the half-sent one's.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from baton.v1 import kv_transfer_pb2, worker_pb2
from kv_transfer.base import gather_blocks
from kv_transfer.dist_receiver import DistKVReceiver
from kv_transfer.dist_sender import SenderConnection
from kv_transfer.pair import Backend
from kv_transfer.wire import (
    CHECKSUMS,
    as_secret,
    build_header,
    handle_from_kv_target,
    handle_to_kv_target,
    message_views,
)
from tests.kv_transfer.harness import PEER_SEED, REPORT_TAG, random_cache


def _print(payload: dict) -> None:
    print(REPORT_TAG + json.dumps(payload), flush=True)


def run_receiver(args: argparse.Namespace) -> None:
    layout = json.loads(args.layout)
    kv_cache = torch.zeros(
        layout["num_layers"], 2, layout["num_blocks"], layout["block_size"], layout["num_kv_heads"], layout["head_dim"],
        dtype=getattr(torch, layout["dtype"]), device=args.device,
    )  # fmt: skip
    receiver = DistKVReceiver(kv_cache, backend=args.backend, secret=args.secret)
    block_ids = list(range(layout["num_blocks"] - args.num_blocks, layout["num_blocks"]))
    handle = receiver.reserve(
        "peer-request", block_ids, args.num_blocks * layout["block_size"], time.time() + args.deadline
    )
    _print({"target": handle_to_kv_target(handle).SerializeToString().hex()})
    time.sleep(600)


def _source(handle, device: str, seed: int) -> torch.Tensor:
    layout = handle.layout
    return random_cache(
        layout.num_layers, len(handle.block_ids), layout.block_size, layout.num_kv_heads, layout.head_dim,
        layout.torch_dtype, device, seed=seed,
    )  # fmt: skip


def _send_whole(connection: SenderConnection, handle, args: argparse.Namespace, deadline: float) -> None:
    piece = gather_blocks(_source(handle, args.device, PEER_SEED + 1), range(len(handle.block_ids)))
    header = build_header(handle, 0, piece, 0, args.message_bytes, CHECKSUMS["none"])
    connection.send_header(header, deadline)
    works = connection.post_messages(message_views(piece, header))
    done = kv_transfer_pb2.TransferDone(
        request_id=handle.request_id, handle_id=handle.handle_id, num_pieces=1
    )
    connection.send_done(done, deadline)
    connection.read_ack(deadline)  # the piece landed
    connection.read_ack(deadline)  # the transfer succeeded
    for work in works:
        work.wait()


def run_sender_half(args: argparse.Namespace) -> None:
    target = worker_pb2.KVTarget.FromString(bytes.fromhex(args.target))
    handle = handle_from_kv_target(target, args.request_id)
    num_blocks = len(handle.block_ids)
    kv_cache = _source(handle, args.device, PEER_SEED)
    backend = Backend(args.backend, torch.device(args.device))
    backend.activate()
    deadline = time.time() + 60
    connection = SenderConnection.open(
        handle.address, backend=backend, secret=as_secret(args.secret), sender_id="half-sender",
        local_host="127.0.0.1", deadline=deadline, group_timeout=60,
    )  # fmt: skip
    if args.full_target:
        full_target = worker_pb2.KVTarget.FromString(bytes.fromhex(args.full_target))
        full = handle_from_kv_target(full_target, args.full_request_id)
        _send_whole(connection, full, args, deadline)
    piece = gather_blocks(kv_cache, range(num_blocks))
    header = build_header(handle, 0, piece, 0, args.message_bytes, CHECKSUMS["none"])
    connection.send_header(header, deadline)
    views = message_views(piece, header)
    half = max(1, len(views) // 2)
    for work in connection.post_messages(views[:half]):
        work.wait()  # gloo: handed to the socket; nccl: ordered before the synchronize below
    if kv_cache.is_cuda:
        torch.cuda.synchronize()
    _print({"sent": half, "of": len(views)})
    if sys.stdin.readline().strip() == "rest":  # the test says when (if ever) the rest follows
        for tag in range(half, len(views)):
            connection.post_message(views[tag], tag).wait()
        if kv_cache.is_cuda:
            torch.cuda.synchronize()
        _print({"sent": len(views), "of": len(views)})
    time.sleep(600)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["receiver", "sender-half", "sender-full-then-half"])
    parser.add_argument("--backend", default="gloo")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--secret", required=True)
    parser.add_argument(
        "--layout", help="receiver: JSON of num_layers, num_blocks, block_size, num_kv_heads, head_dim, dtype"
    )
    parser.add_argument("--num-blocks", type=int, default=4)
    parser.add_argument("--deadline", type=float, default=60.0)
    parser.add_argument("--target", help="sender-half: KVTarget bytes, hex")
    parser.add_argument("--full-target", help="sender-full-then-half: the first, whole piece's KVTarget, hex")
    parser.add_argument("--full-request-id", default="peer-full")
    parser.add_argument("--request-id", default="peer-request")
    parser.add_argument("--message-bytes", type=int, default=4096)
    args = parser.parse_args(argv)
    if args.mode == "receiver":
        run_receiver(args)
    else:
        if (args.mode == "sender-full-then-half") != bool(args.full_target):
            parser.error("--full-target goes with (and only with) sender-full-then-half")
        run_sender_half(args)


if __name__ == "__main__":
    main(sys.argv[1:])
