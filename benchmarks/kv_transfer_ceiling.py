"""Where the time of a KV transfer goes: the transport's steps rebuilt one at a time on bare NCCL.

    python benchmarks/kv_transfer_ceiling.py [--high-priority both]

Two processes on cuda:0 -> cuda:1 with plain ``torch.distributed`` send/recv (no Baton transport, no
control socket), the KV of a 2,048-token prompt of the Llama-3.1-8B shape (256 MiB) in a layer-major
paged cache like the engine's. Every variant is sent behind a 2 ms GPU busy-wait standing in for the
prefill step, and timed from that step's end (seen by the sender's host) to the receiver's host
seeing the last byte in place. Variants, each adding one thing to the one before:

  raw           one 256 MiB message from a contiguous buffer (the ceiling)
  messages      the transport's framing: 80, 80, 80, 16 MiB messages, still from a contiguous buffer
  +gather       each message's layers gathered from the paged cache right before it is sent
  +scatter      the receiver copies each message's layers into its paged cache, queued in stream
                order behind that message's receive
  host scatter  the same copies, each issued by the host once it saw its message complete (what
                the transport does, so that only complete messages ever land)
  gather first  the whole piece gathered before the first message
  zero-copy     no gather: 64 messages of 4 MiB straight from the cache (one per layer, K and V),
                batched into one NCCL group
  block-major   what a block-major cache ([blocks, layers, 2, ...]) would allow: a request's
                consecutive blocks are one contiguous range across every layer, so each message (a
                range of blocks, all layers) is sent straight from the cache; the receiver lands each
                message into its cache with a host-issued copy once it saw it complete
  block-major queued   the same with the receiver's copies queued behind the receives

Prints the median of ``--iters`` runs per variant, and its ratio to ``raw``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import time

import torch
import torch.distributed as dist
from kv_transfer_bench import cycles_for  # this folder: the script's own (sys.path[0])

VARIANTS = (
    "raw", "messages", "+gather", "+scatter", "host scatter", "gather first", "zero-copy",
    "block-major", "block-major queued",
)  # fmt: skip
SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


class Setup:
    """One rank's cache, staging buffer and stand-in step."""

    def __init__(self, args, rank: int) -> None:
        self.args = args
        self.device = torch.device(f"cuda:{rank}")
        shape = (args.num_layers, 2, 3 * args.num_blocks, args.block_size, args.num_kv_heads, args.head_dim)
        cache = torch.randn(shape, device=self.device).to(torch.bfloat16)
        self.words = cache.flatten(3).view(torch.int64)  # [layers, 2, blocks, words]
        self.first = args.num_blocks * (1 + rank)  # each side's blocks: a real gather/scatter
        self.layer_bytes = 2 * args.num_blocks * cache[0, 0, 0].numel() * cache.element_size()
        self.staging = torch.empty(args.num_layers * self.layer_bytes, dtype=torch.uint8, device=self.device)
        self.slab = self.staging.view(torch.int64).view(args.num_layers, 2, args.num_blocks, -1)
        self.cycles = cycles_for(args.compute_ms)
        # The same blocks in a block-major cache: [blocks, words of every layer's K and V].
        block_words = self.words[:, :, 0].numel()
        self.blocks_major = torch.empty(3 * args.num_blocks, block_words, dtype=torch.int64, device=self.device)
        self.block_staging = self.staging.view(torch.int64).view(args.num_blocks, -1)

    def block_ranges(self) -> list[tuple[int, int]]:
        """Block ranges of the messages of a block-major piece: the same bytes per message as ``messages``."""
        n, layers, per_message = self.args.num_blocks, self.args.num_layers, self.args.message_layers
        per = max(1, n * per_message // layers)
        return [(lo, min(lo + per, n)) for lo in range(0, n, per)]

    def cache_layers(self, lo: int, hi: int) -> torch.Tensor:
        return self.words[lo:hi, :, self.first : self.first + self.args.num_blocks]

    def messages(self, variant: str) -> list[tuple[int, int]]:
        """``(first layer, end layer)`` of each message."""
        layers, per_message = self.args.num_layers, self.args.message_layers
        if variant == "raw":
            return [(0, layers)]
        return [(lo, min(lo + per_message, layers)) for lo in range(0, layers, per_message)]


def _send(setup: Setup, variant: str) -> list:
    if variant.startswith("block-major"):
        base = setup.first
        return [dist.isend(setup.blocks_major[base + lo : base + hi], 1) for lo, hi in setup.block_ranges()]
    if variant == "zero-copy":
        ops = [
            dist.P2POp(dist.isend, setup.cache_layers(layer, layer + 1)[0, kv], 1)
            for layer in range(setup.args.num_layers)
            for kv in range(2)
        ]
        return dist.batch_isend_irecv(ops)
    if variant == "gather first":
        setup.slab.copy_(setup.cache_layers(0, setup.args.num_layers))
    works = []
    for lo, hi in setup.messages(variant):
        if variant not in ("raw", "messages", "gather first"):
            setup.slab[lo:hi].copy_(setup.cache_layers(lo, hi))
        works.append(dist.isend(setup.slab[lo:hi], 1))
    return works


def _receive(setup: Setup, variant: str) -> None:
    if variant.startswith("block-major"):
        ranges, base = setup.block_ranges(), setup.first
        works = [dist.irecv(setup.block_staging[lo:hi], 0) for lo, hi in ranges]
        for work, (lo, hi) in zip(works, ranges, strict=True):
            if variant == "block-major":
                while not work.is_completed():
                    time.sleep(0)
            work.wait()
            setup.blocks_major[base + lo : base + hi].copy_(setup.block_staging[lo:hi])
        return
    if variant == "zero-copy":
        ops = [
            dist.P2POp(dist.irecv, setup.slab[layer, kv], 0)
            for layer in range(setup.args.num_layers)
            for kv in range(2)
        ]
        for work in dist.batch_isend_irecv(ops):
            work.wait()
        return
    spans = setup.messages(variant)
    works = [dist.irecv(setup.slab[lo:hi], 0) for lo, hi in spans]
    for work, (lo, hi) in zip(works, spans, strict=True):
        if variant == "host scatter":
            while not work.is_completed():
                time.sleep(0)
        work.wait()  # the current stream waits for the message
        if variant in ("+scatter", "host scatter"):
            setup.cache_layers(lo, hi).copy_(setup.slab[lo:hi])


def _run(rank: int, args) -> None:
    torch.cuda.set_device(rank)
    store = dist.TCPStore("127.0.0.1", args.port, 2, rank == 0, datetime.timedelta(seconds=60))
    results = {}
    for high_priority in args.priorities:
        options = dist.ProcessGroupNCCL.Options()
        options.is_high_priority_stream = high_priority
        dist.init_process_group(
            "nccl", store=dist.PrefixStore(f"hp{high_priority}/", store), rank=rank, world_size=2,
            pg_options=options, device_id=torch.device(f"cuda:{rank}"),
        )  # fmt: skip
        setup = Setup(args, rank)
        for variant in VARIANTS:
            times = []
            for it in range(args.warmup + args.iters):
                key = f"{high_priority}/{variant}/{it}"
                dist.barrier()
                torch.cuda.synchronize()
                if rank == 0:
                    torch.cuda._sleep(setup.cycles)  # the stand-in step, then everything queued behind it
                    step_done = torch.cuda.Event()
                    step_done.record()
                    works = _send(setup, variant)
                    while not step_done.query():
                        pass
                    store.set(f"start/{key}", repr(time.time()))
                    for work in works:
                        work.wait()
                    torch.cuda.synchronize()
                else:
                    _receive(setup, variant)
                    landed = torch.cuda.Event()
                    landed.record()
                    while not landed.query():
                        time.sleep(0)
                    store.set(f"end/{key}", repr(time.time()))
                if rank == 0 and it >= args.warmup:
                    end = float(store.get(f"end/{key}"))
                    times.append(end - float(store.get(f"start/{key}")))
            if rank == 0:
                results[(high_priority, variant)] = statistics.median(times)
        dist.destroy_process_group()
    if rank == 0:
        print(f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, {args.iters} runs per variant")
        print(f"{'NCCL streams':<14}{'variant':<15}{'ms':>8}{'ratio':>8}")
        for high_priority in args.priorities:
            raw = results[(high_priority, "raw")]
            for variant in VARIANTS:
                ms = results[(high_priority, variant)] * 1e3
                label = "high priority" if high_priority else "default"
                print(f"{label:<14}{variant:<15}{ms:>8.3f}{raw / results[(high_priority, variant)]:>8.2f}")


def main() -> None:
    for key, value in SAFE_ENV.items():
        os.environ.setdefault(key, value)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-layers", type=int, default=32)
    parser.add_argument("--num-kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--num-blocks", type=int, default=128, help="2048 tokens / block size 16")
    parser.add_argument("--message-layers", type=int, default=10, help="layers per message (80 MiB)")
    parser.add_argument("--compute-ms", type=float, default=2.0)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--high-priority", choices=["on", "off", "both"], default="both")
    parser.add_argument("--port", type=int, default=29533)
    args = parser.parse_args()
    args.priorities = {"on": [True], "off": [False], "both": [False, True]}[args.high_priority]
    if torch.cuda.device_count() < 2:
        raise SystemExit("needs two CUDA GPUs")
    torch.multiprocessing.spawn(_run, args=(args,), nprocs=2)


if __name__ == "__main__":
    main()
