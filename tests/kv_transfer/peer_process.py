"""A real peer process for the transfer tests, killed by the test mid-transfer.

Run as ``python -m tests.kv_transfer.peer_process MODE ...`` from the repository root. It prints one
JSON line when it reached the point the test waits for, then sleeps until killed.

Modes:
- ``receiver``: owns a cache, reserves blocks, prints ``{"target": <KVTarget hex>}``.
- ``sender-half``: sends the header of a piece covering every reserved block of ``--target`` and only
  the first half of its messages, then prints ``{"sent": <messages>, "of": <total>}``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from baton.v1 import worker_pb2
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
from tests.kv_transfer.harness import PEER_SEED, random_cache


def _print(payload: dict) -> None:
    print(json.dumps(payload), flush=True)


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


def run_sender_half(args: argparse.Namespace) -> None:
    target = worker_pb2.KVTarget.FromString(bytes.fromhex(args.target))
    handle = handle_from_kv_target(target, args.request_id)
    layout = handle.layout
    num_blocks = len(handle.block_ids)
    kv_cache = random_cache(
        layout.num_layers, num_blocks, layout.block_size, layout.num_kv_heads, layout.head_dim,
        layout.torch_dtype, args.device, seed=PEER_SEED,
    )  # fmt: skip
    backend = Backend(args.backend, torch.device(args.device))
    backend.activate()
    deadline = time.time() + 60
    connection = SenderConnection.open(
        handle.address, backend=backend, secret=as_secret(args.secret), sender_id="half-sender",
        local_host="127.0.0.1", deadline=deadline, group_timeout=60,
    )  # fmt: skip
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
    time.sleep(600)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["receiver", "sender-half"])
    parser.add_argument("--backend", default="gloo")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--secret", required=True)
    parser.add_argument(
        "--layout", help="receiver: JSON of num_layers, num_blocks, block_size, num_kv_heads, head_dim, dtype"
    )
    parser.add_argument("--num-blocks", type=int, default=4)
    parser.add_argument("--deadline", type=float, default=60.0)
    parser.add_argument("--target", help="sender-half: KVTarget bytes, hex")
    parser.add_argument("--request-id", default="peer-request")
    parser.add_argument("--message-bytes", type=int, default=4096)
    args = parser.parse_args(argv)
    if args.mode == "receiver":
        run_receiver(args)
    else:
        run_sender_half(args)


if __name__ == "__main__":
    main(sys.argv[1:])
