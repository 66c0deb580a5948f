"""KV transfer between two GPUs: raw NCCL send/recv vs Baton's nccl transport, in the same run.

    python benchmarks/kv_transfer_bench.py --out bench_results/kv_transfer.json

Moves the KV of a 2k-token prompt of a Llama-3.1-8B-shaped model (32 layers, 8 KV heads, head dim 128,
bf16, block size 16 -> 128 blocks, 256 MiB) from cuda:0 (sender, rank 0) to cuda:1 (receiver, rank 1).
Two processes, one per GPU.

- Raw NCCL: back-to-back ``send``/``recv`` of N contiguous bytes on a standalone 2-rank ProcessGroupNCCL
  (the same group options as the transport), timed on the sender from the call to the end of a sync,
  before and again after our transfers; ratios use the median of both sets of samples.
- Ours: ``NcclKVSender.send`` of blocks of the sender's paged cache into blocks reserved in the
  receiver's paged cache, both stored as ``--layout`` says (default block-major, as the engine's GPU
  cache: consecutive source blocks leave straight from the cache). Two times per transfer, both from the moment ``send`` is called:
  *receiver* = until the receiver's ``poll`` says SUCCESS (every block in its cache: the time a decode
  worker waits), *sender* = until the sender's ``poll`` says SUCCESS (the receiver's answer came back).
  Block ids are either one contiguous run ("contiguous") or a random set ("scattered").
- Copy ceilings on the sender's GPU: a plain device copy and the gathers, for context.

SUCCESS is seen through the transports' blocking ``wait`` (woken when the state changes), and for one
group through ``poll`` every 50 us, as a worker loop would; the timer slack of both roles' threads is
lowered to 1 us (Linux) so sleeps and timeouts last what they ask. A few more transfers are traced
(wall-clock stamps inside the transport) to show where the time goes, and a few are counted: the calls
from Python into torch on the sender's calling thread and the receiver's connection thread
(kv_transfer/call_count.py), before the first send / receive is posted and after the last message
arrived. Prints a table, then the headline (send() -> receiver SUCCESS at the default message size,
contiguous ids, and its ratio to raw NCCL); writes every number as JSON. The whole run is bounded by
``--timeout`` seconds.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import os
import random
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import kv_transfer_trace as trace  # this folder: the script's own (sys.path[0])
from kv_transfer_report import MiB, print_table, summarize  # same folder

REPO_ROOT = Path(__file__).resolve().parents[1]
SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
SECRET = "kv-transfer-bench"
PATTERNS = ("contiguous", "scattered")
TRACED = 5  # traced transfers after the timed ones (default message size, contiguous)
COUNTED = 3  # counted transfers per pattern, last (calls into torch; the counting slows them down)
POLL_S = 50e-6  # the polled run's interval


def _emit(payload: dict) -> None:
    print(json.dumps(payload), flush=True)


def _low_timer_slack() -> None:
    try:
        ctypes.CDLL(None, use_errno=True).prctl(29, 1000, 0, 0, 0)  # PR_SET_TIMERSLACK, ns
    except (OSError, AttributeError):
        pass


def _cache(args, num_blocks: int, device):
    """A zeroed bf16 paged cache stored as ``--layout`` says (the engine's GPU cache: block-major)."""
    import torch

    from engine.kv_cache.storage import allocate_kv_cache

    return allocate_kv_cache(
        args.num_layers, num_blocks, args.block_size, args.num_kv_heads, args.head_dim,
        dtype=torch.bfloat16, device=device, block_major=args.layout == "block-major",
    )  # fmt: skip


def _plan(args) -> list[dict]:
    """Every group of transfers, in order; both roles derive the same plan from the arguments."""
    from kv_transfer.dist_sender import DEFAULT_MAX_MESSAGE_BYTES

    per_config, default_mib = args.warmup + args.iters, DEFAULT_MAX_MESSAGE_BYTES // MiB
    plan = [
        {"name": f"{mib}-{pattern}", "mib": mib, "pattern": pattern, "how": "wait", "count": per_config}
        for mib in args.message_mib
        for pattern in PATTERNS
    ]
    plan.append(
        {"name": "polled", "mib": default_mib, "pattern": "contiguous", "how": "poll", "count": per_config}
    )
    # As a prefill worker sends: queued right behind the step that writes the KV (a GPU busy-wait of
    # --compute-ms stands in for it), timed from the moment that step ends; at the default message
    # size ("behind-compute", the headline's row) and any other --behind-mib.
    for mib in dict.fromkeys([default_mib, *args.behind_mib]):
        name = "behind-compute" if mib == default_mib else f"behind-compute-{mib}"
        plan.append({"name": name, "mib": mib, "pattern": "contiguous", "how": "wait", "count": per_config})
    for name in ("trace", "trace-behind"):
        plan.append({"name": name, "mib": default_mib, "pattern": "contiguous", "how": "wait", "count": TRACED})
    for pattern in PATTERNS:
        plan.append(
            {
                "name": f"count-{pattern}",
                "mib": default_mib,
                "pattern": pattern,
                "how": "wait",
                "count": COUNTED,
            }
        )
    return plan


def _until_terminal(side, handle, how: str) -> None:
    """Block in ``wait``, or poll every ``POLL_S`` (a worker loop that checks its transfers)."""
    if how == "wait":
        side.wait(handle, timeout=60)
        return
    deadline = time.monotonic() + 60
    while not side.poll(handle).is_terminal and time.monotonic() < deadline:
        time.sleep(POLL_S)


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _device(args, index: int):
    import torch

    if args.backend == "gloo":  # a CPU rehearsal of the whole script
        return torch.device("cpu")
    device = torch.device(f"cuda:{index}")
    torch.cuda.set_device(device)
    return device


def block_fingerprint(kv_cache, block_ids) -> int:
    """Exact, order-sensitive digest of ``kv_cache[:, :, block_ids]``: position-weighted integer sums."""
    import torch

    blocks = kv_cache[:, :, list(block_ids)]
    words = blocks.view(torch.int16) if blocks.element_size() == 2 else blocks.view(torch.int32)
    per_block = words.sum(dim=(0, 1, 3, 4, 5), dtype=torch.int64)
    weights = torch.arange(1, len(block_ids) + 1, dtype=torch.int64, device=per_block.device)
    return int((per_block * weights).sum())


# ----------------------------------------------------------------------------------------- raw NCCL


def raw_nccl(args, rank: int, device, prefix: str = "raw/") -> list[dict]:
    """Back-to-back send/recv of each ``--raw-sizes-mib`` on a group of its own: every sample (s)."""
    import torch
    import torch.distributed as dist

    from kv_transfer.pair import Backend, make_group, teardown_group

    store = dist.TCPStore("127.0.0.1", args.store_port, None, False, datetime.timedelta(seconds=60))
    group = make_group(Backend(args.backend, device), store, prefix, rank, "127.0.0.1", 60.0)
    results = []
    for size in args.raw_sizes_mib:
        buffer = torch.ones(size * MiB, dtype=torch.uint8, device=device)

        def step(buffer=buffer) -> None:
            work = group.send([buffer], 1, 0) if rank == 0 else group.recv([buffer], 0, 0)
            work.wait()

        for _ in range(args.warmup):
            step()
        _sync(device)
        times = []
        for _ in range(args.iters):
            start = time.perf_counter()
            step()
            _sync(device)
            times.append(time.perf_counter() - start)
        results.append({"bytes": size * MiB, "samples_s": times})
    teardown_group(group)
    return results


def pooled_raw(before: list[dict], after: list[dict]) -> list[dict]:
    """Raw NCCL timed before and after our transfers, pooled: the reference moves between runs by as
    much as the margin we measure, so it is sampled on both sides of them, and both halves reported."""
    out = []
    for first, second in zip(before, after, strict=True):
        samples = first["samples_s"] + second["samples_s"]
        median = statistics.median(samples)
        out.append(
            {
                "bytes": first["bytes"],
                "median_s": median,
                "gb_per_s": first["bytes"] / median / 1e9,
                "median_before_s": statistics.median(first["samples_s"]),
                "median_after_s": statistics.median(second["samples_s"]),
            }
        )
    return out


# ------------------------------------------------------------------------------------ our transport


def run_receiver(args) -> None:

    from kv_transfer.dist_receiver import DistKVReceiver
    from kv_transfer.wire import handle_to_kv_target

    device = _device(args, 1)
    raw = raw_nccl(args, 1, device)
    plan = _plan(args)
    # Blocks [0, shared) serve every transfer but the last of each group, which gets blocks of its own,
    # so its data can still be checked after the later groups ran.
    shared = 2 * args.num_blocks + 16
    total_blocks = shared + len(plan) * args.num_blocks
    kv_cache = _cache(args, total_blocks, device)
    receiver = DistKVReceiver(kv_cache, backend=args.backend, secret=SECRET, group_timeout=120)
    rng = random.Random(1)
    handles, hows, checked = [], [], []
    num_tokens = args.num_blocks * args.block_size
    for index, config in enumerate(plan):
        for i in range(config["count"]):
            if i == config["count"] - 1:
                dst = list(range(shared + index * args.num_blocks, shared + (index + 1) * args.num_blocks))
                if config["pattern"] == "scattered":
                    rng.shuffle(dst)
            elif config["pattern"] == "contiguous":
                first = 0 if i % 2 == 0 else args.num_blocks
                dst = list(range(first, first + args.num_blocks))
            else:
                dst = rng.sample(range(shared), args.num_blocks)
            name = f"bench-{config['name']}-{i}"
            handles.append(receiver.reserve(name, dst, num_tokens, time.time() + 600))
            hows.append(config["how"])
        checked.append(handles[-1])
    tracer = trace.tracer_for(plan, handles)
    tracer.install_receiver()
    _emit({"targets": [handle_to_kv_target(h).SerializeToString().hex() for h in handles]})
    success_at = []
    for handle, how in zip(handles, hows, strict=True):
        _until_terminal(receiver, handle, how)
        success_at.append(time.time())
    states = [receiver.poll(h).value for h in handles]
    fingerprints = [block_fingerprint(kv_cache, handle.block_ids) for handle in checked]
    raw = pooled_raw(raw, raw_nccl(args, 1, device, "raw-after/"))
    _emit(
        {
            "raw": raw,
            "receiver_states": {s: states.count(s) for s in set(states)},
            "success_at": success_at,
            "fingerprints": fingerprints,
            "trace": tracer.events,
            "counts": trace.counts_by_group(plan, handles, tracer, "receiver"),
        }
    )
    receiver.close()


def _copy_ceilings(args, kv_cache, src_by_pattern: dict, device) -> dict:
    import torch

    from kv_transfer.base import gather_blocks
    from kv_transfer.blocks import BlockMover, CacheBlocks, as_words

    def timed(fn) -> float:
        for _ in range(3):
            fn()
        _sync(device)
        start = time.perf_counter()
        for _ in range(args.iters):
            fn()
        _sync(device)
        return (time.perf_counter() - start) / args.iters

    piece = gather_blocks(kv_cache, src_by_pattern["contiguous"])  # block-major, as it travels
    other = torch.empty_like(piece)
    out = {"plain_copy_s": timed(lambda: other.copy_(piece))}
    cache_words = CacheBlocks(kv_cache).words
    piece_words = as_words(piece, cache_words.dtype)
    for pattern, src in src_by_pattern.items():
        mover = BlockMover(src, device)
        out[f"gather_{pattern}_s"] = timed(
            lambda m=mover: m.gather(cache_words, piece_words, 0, args.num_blocks)
        )
        out[f"index_select_{pattern}_s"] = timed(lambda s=src: gather_blocks(kv_cache, s))
    out["bytes"] = piece.numel() * piece.element_size()
    return out


def cycles_for(ms: float) -> int:
    """GPU clock cycles that ``torch.cuda._sleep`` needs to busy-wait ``ms`` milliseconds on the current
    device (measured); also used by kv_transfer_ceiling.py."""
    import torch

    probe = 10_000_000
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(probe)  # warm-up
    start.record()
    torch.cuda._sleep(probe)
    end.record()
    end.synchronize()
    return int(probe * ms / start.elapsed_time(end))


def _stand_in_step(cycles: int):
    """Queue a GPU busy-wait standing in for the prefill step that writes the KV; its end event."""
    import torch

    torch.cuda._sleep(cycles)
    done = torch.cuda.Event()
    done.record()
    return done


def run_sender(args) -> None:
    import torch

    from baton.v1 import worker_pb2
    from kv_transfer.base import TransferState
    from kv_transfer.dist_sender import DistKVSender
    from kv_transfer.wire import handle_from_kv_target

    device = _device(args, 0)
    raw = raw_nccl(args, 0, device)
    total_blocks = args.num_blocks + 64
    generator = torch.Generator(device=device).manual_seed(0)
    kv_cache = _cache(args, total_blocks, device)
    kv_cache.copy_(torch.randn(kv_cache.shape, generator=generator, device=device))
    rng = random.Random(2)
    src_by_pattern = {
        "contiguous": list(range(64, 64 + args.num_blocks)),  # not the receiver's ids: a real gather/scatter
        "scattered": rng.sample(range(total_blocks), args.num_blocks),
    }
    targets = json.loads(sys.stdin.readline())["targets"]
    plan = _plan(args)
    request_ids = [f"bench-{c['name']}-{i}" for c in plan for i in range(c["count"])]
    handles = [
        handle_from_kv_target(worker_pb2.KVTarget.FromString(bytes.fromhex(t)), rid)
        for t, rid in zip(targets, request_ids, strict=True)
    ]
    tracer = trace.tracer_for(plan, handles)
    tracer.install_sender()
    compute_cycles = cycles_for(args.compute_ms) if device.type == "cuda" else 0
    senders: dict[int, DistKVSender] = {}  # one per message size, each with its own link
    results, started, cursor = [], [], 0
    for config in plan:
        sender = senders.get(config["mib"])
        if sender is None:
            sender = senders[config["mib"]] = DistKVSender(
                backend=args.backend,
                device=device,
                secret=SECRET,
                max_message_bytes=config["mib"] * MiB,
                group_timeout=120,
            )
        src, times = src_by_pattern[config["pattern"]], []
        behind = config["name"].startswith(("behind-compute", "trace-behind")) and device.type == "cuda"
        for _ in range(config["count"]):
            handle = handles[cursor]
            cursor += 1
            if behind:
                kv_ready = _stand_in_step(compute_cycles)
            else:
                started.append(time.time())
                start = time.perf_counter()
            tracer.mark(handle.handle_id, "send")
            sender.send(handle, src, kv_cache)
            tracer.mark(handle.handle_id, "send returned")
            if behind:  # the clock starts when the KV exists, not when send() was called
                while not kv_ready.query():
                    pass
                tracer.mark(handle.handle_id, "kv ready")
                started.append(time.time())
                start = time.perf_counter()
            _until_terminal(sender, handle, config["how"])
            times.append(time.perf_counter() - start)
            if sender.poll(handle) is not TransferState.SUCCESS:
                raise SystemExit(f"transfer failed: {sender.error(handle)}")
        results.append(
            {
                **config,
                "sender_s": times[args.warmup :] if not config["name"].startswith("trace") else times,
                "fingerprint": block_fingerprint(kv_cache, src),
            }
        )
    for sender in senders.values():
        sender.close()
    raw = pooled_raw(raw, raw_nccl(args, 0, device, "raw-after/"))
    ceilings = _copy_ceilings(args, kv_cache, src_by_pattern, device)
    _emit(
        {
            "raw": raw,
            "ours": results,
            "started_at": started,
            "ceilings": ceilings,
            "trace": tracer.events,
            "counts": trace.counts_by_group(plan, handles, tracer, "sender"),
        }
    )


# ------------------------------------------------------------------------------------- orchestrator


def orchestrate(args) -> int:
    import torch
    import torch.distributed as dist

    if args.backend == "nccl" and torch.cuda.device_count() < 2:
        raise SystemExit("needs two CUDA GPUs")
    store = dist.TCPStore("127.0.0.1", 0, None, True, datetime.timedelta(seconds=120), wait_for_workers=False)
    env = dict(
        os.environ, PYTHONPATH=f"{REPO_ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", **SAFE_ENV
    )
    common = [f"--store-port={store.port}", *sys.argv[1:]]
    command = [sys.executable, str(Path(__file__).resolve())]
    receiver = subprocess.Popen(
        [*command, "--role=receiver", *common], env=env, stdout=subprocess.PIPE, text=True
    )
    sender = subprocess.Popen(
        [*command, "--role=sender", *common],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    expired = threading.Event()

    def give_up() -> None:  # a hung role must not hang the run: kill both, then the reads below fail
        expired.set()
        for process in (sender, receiver):
            process.kill()

    watchdog = threading.Timer(args.timeout, give_up)
    watchdog.start()
    try:
        targets = receiver.stdout.readline()
        sender.stdin.write(targets)
        sender.stdin.flush()
        sent = json.loads(sender.stdout.readline() or "null")
        if sent is None:  # the sender failed: the receiver would wait for its transfers in vain
            receiver.kill()
        received = json.loads(receiver.stdout.readline() or "null")
    finally:
        for process in (sender, receiver):
            try:
                process.wait(timeout=max(1.0, args.timeout / 4))
            except subprocess.TimeoutExpired:
                process.kill()
        watchdog.cancel()
    if expired.is_set() or sent is None or received is None:
        raise SystemExit(f"a role {'ran past --timeout' if expired.is_set() else 'failed'}; no report")
    report = summarize(args, sent, received)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
    print_table(args, report)
    return 0 if report["data_matches"] and set(report["receiver_states"]) == {"success"} else 1


def main() -> int:
    for key, value in SAFE_ENV.items():
        os.environ.setdefault(key, value)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--role", choices=["orchestrator", "sender", "receiver"], default="orchestrator")
    parser.add_argument("--store-port", type=int, default=0)
    parser.add_argument("--backend", choices=["nccl", "gloo"], default="nccl", help="gloo: CPU rehearsal")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--compute-ms", type=float, default=2.0, help="the stand-in step before each behind-compute transfer"
    )
    parser.add_argument(
        "--layout",
        choices=["block-major", "layer-major"],
        default="block-major",
        help="how both paged caches are stored (the engine's GPU cache: block-major)",
    )
    parser.add_argument("--num-layers", type=int, default=32)
    parser.add_argument("--num-kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--num-blocks", type=int, default=128, help="2048 tokens / block size 16")
    parser.add_argument("--message-mib", type=int, nargs="+", default=[32, 64, 80, 128, 256])
    parser.add_argument(
        "--behind-mib", type=int, nargs="*", default=[], help="more message sizes for the behind-compute row"
    )
    parser.add_argument("--raw-sizes-mib", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--timeout", type=float, default=110.0, help="seconds before the whole run gives up")
    args = parser.parse_args()
    if args.role != "orchestrator":
        _low_timer_slack()
    if args.role == "receiver":
        run_receiver(args)
        return 0
    if args.role == "sender":
        run_sender(args)
        return 0
    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
