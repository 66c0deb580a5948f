"""KV transfer between two GPUs: raw NCCL send/recv vs Baton's nccl transport, in the same run.

    python benchmarks/kv_transfer_bench.py --out bench_results/kv_transfer.json

Moves the KV of a 2k-token prompt of a Llama-3.1-8B-shaped model (32 layers, 8 KV heads, head dim 128,
bf16, block size 16 -> 128 blocks, 256 MiB) from cuda:0 (sender, rank 0) to cuda:1 (receiver, rank 1).
Two processes, one per GPU. Raw NCCL: back-to-back ``send``/``recv`` of N bytes on a standalone
2-rank ProcessGroupNCCL. Ours: ``NcclKVSender.send`` -> ``poll`` until SUCCESS, which covers the
gather of the blocks, the control round trips, the bytes, the scatter on the receiver and its acks.
Prints a table; writes every number as JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
MiB = 1 << 20
SECRET = "kv-transfer-bench"


def _emit(payload: dict) -> None:
    print(json.dumps(payload), flush=True)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _cache_shape(args, num_blocks: int) -> tuple[int, ...]:
    return (args.num_layers, 2, num_blocks, args.block_size, args.num_kv_heads, args.head_dim)


# ----------------------------------------------------------------------------------------- raw NCCL


def raw_nccl(args, rank: int, device) -> list[dict]:
    import torch
    import torch.distributed as dist

    from kv_transfer.pair import Backend, make_group, teardown_group

    store = dist.TCPStore("127.0.0.1", args.store_port, None, False, datetime.timedelta(seconds=60))
    group = make_group(Backend(args.backend, device), store, "raw/", rank, "127.0.0.1", 60.0)
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
        median = statistics.median(times)
        results.append({"bytes": size * MiB, "median_s": median, "gb_per_s": size * MiB / median / 1e9})
    teardown_group(group)
    return results


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


# ------------------------------------------------------------------------------------ our transport


def run_receiver(args) -> None:
    import torch

    from kv_transfer.dist_receiver import DistKVReceiver
    from kv_transfer.wire import handle_to_kv_target

    device = _device(args, 1)
    raw = raw_nccl(args, 1, device)
    kv_cache = torch.zeros(_cache_shape(args, 2 * args.num_blocks), dtype=torch.bfloat16, device=device)
    receiver = DistKVReceiver(kv_cache, backend=args.backend, secret=SECRET, group_timeout=120)
    handles = []
    for config in range(len(args.message_mib)):
        for i in range(args.warmup + args.iters):
            dst = range(args.num_blocks) if i % 2 == 0 else range(args.num_blocks, 2 * args.num_blocks)
            handles.append(
                receiver.reserve(
                    f"bench-{config}-{i}", list(dst), args.num_blocks * args.block_size, time.time() + 600
                )
            )
    _emit({"targets": [handle_to_kv_target(h).SerializeToString().hex() for h in handles]})
    deadline = time.time() + 300
    while time.time() < deadline and not all(receiver.poll(h).is_terminal for h in handles):
        time.sleep(0.01)
    states = [receiver.poll(h).value for h in handles]
    last = handles[-1]
    checksum = float(kv_cache[:, :, list(last.block_ids)].double().sum())
    _emit(
        {"raw": raw, "receiver_states": {s: states.count(s) for s in set(states)}, "last_checksum": checksum}
    )
    receiver.close()


def run_sender(args) -> None:
    import torch

    from baton.v1 import worker_pb2
    from kv_transfer.base import TransferState, gather_blocks
    from kv_transfer.dist_sender import DistKVSender
    from kv_transfer.wire import handle_from_kv_target

    device = _device(args, 0)
    raw = raw_nccl(args, 0, device)
    generator = torch.Generator(device=device).manual_seed(0)
    kv_cache = torch.randn(_cache_shape(args, args.num_blocks + 64), generator=generator, device=device).to(
        torch.bfloat16
    )
    src_ids = list(range(64, 64 + args.num_blocks))  # not the receiver's ids: a real gather/scatter
    targets = json.loads(sys.stdin.readline())["targets"]
    per_config = args.warmup + args.iters
    # The request id travels beside the KVTarget (in PrefillRequest); here it follows the receiver's naming.
    handles = [
        handle_from_kv_target(
            worker_pb2.KVTarget.FromString(bytes.fromhex(t)), f"bench-{i // per_config}-{i % per_config}"
        )
        for i, t in enumerate(targets)
    ]
    results = []
    for config, message_mib in enumerate(args.message_mib):
        sender = DistKVSender(
            backend=args.backend,
            device=device,
            secret=SECRET,
            max_message_bytes=message_mib * MiB,
            group_timeout=120,
        )
        times = []
        for i in range(per_config):
            handle = handles[config * per_config + i]
            start = time.perf_counter()
            sender.send(handle, src_ids, kv_cache)
            while not sender.poll(handle).is_terminal:
                time.sleep(2e-5)  # yield the GIL to the link thread
            elapsed = time.perf_counter() - start
            if sender.poll(handle) is not TransferState.SUCCESS:
                raise SystemExit(f"transfer failed: {sender.error(handle)}")
            if i >= args.warmup:
                times.append(elapsed)
        sender.close()
        payload = args.num_blocks * handles[0].layout.block_bytes
        median = statistics.median(times)
        results.append(
            {
                "message_bytes": message_mib * MiB,
                "payload_bytes": payload,
                "median_s": median,
                "gb_per_s": payload / median / 1e9,
            }
        )
    # The gather alone (the receiver's scatter costs about the same).
    for _ in range(3):
        gather_blocks(kv_cache, src_ids)
    _sync(device)
    start = time.perf_counter()
    for _ in range(args.iters):
        gather_blocks(kv_cache, src_ids)
    _sync(device)
    gather_s = (time.perf_counter() - start) / args.iters
    checksum = float(kv_cache[:, :, src_ids].double().sum())
    _emit({"raw": raw, "ours": results, "gather_s": gather_s, "src_checksum": checksum})


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
    try:
        targets = receiver.stdout.readline()
        sender.stdin.write(targets)
        sender.stdin.flush()
        sent = json.loads(sender.stdout.readline())
        received = json.loads(receiver.stdout.readline())
    finally:
        for process in (sender, receiver):
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
    report = {
        "device": torch.cuda.get_device_name(0) if args.backend == "nccl" else "cpu (gloo rehearsal)",
        "backend": args.backend,
        "torch": torch.__version__,
        "shape": {
            k: getattr(args, k)
            for k in ("num_layers", "num_kv_heads", "head_dim", "block_size", "num_blocks")
        },
        "raw_nccl": sent["raw"],
        "ours": sent["ours"],
        "gather_s": sent["gather_s"],
        "receiver_states": received["receiver_states"],
        "data_matches": abs(received["last_checksum"] - sent["src_checksum"])
        <= 1e-6 * max(1.0, abs(sent["src_checksum"])),
    }
    raw_by_size = {r["bytes"]: r for r in sent["raw"]}
    for row in report["ours"]:
        raw = raw_by_size.get(row["payload_bytes"])
        row["ratio_to_raw"] = row["gb_per_s"] / raw["gb_per_s"] if raw else None
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
    print(
        f"\n{report['device']}, torch {report['torch']}, receiver states {report['receiver_states']}, data matches: {report['data_matches']}"
    )
    print(f"gather of {args.num_blocks} blocks: {sent['gather_s'] * 1e3:.3f} ms")
    print(f"{'what':<34}{'bytes':>12}{'median ms':>12}{'GB/s':>10}{'ratio':>8}")
    for row in sent["raw"]:
        print(
            f"{'raw ' + args.backend + ' send/recv':<34}{row['bytes']:>12}{row['median_s'] * 1e3:>12.3f}{row['gb_per_s']:>10.1f}{'':>8}"
        )
    for row in report["ours"]:
        ratio = f"{row['ratio_to_raw']:.2f}" if row["ratio_to_raw"] else "-"
        what = f"ours ({args.backend}), {row['message_bytes'] // MiB} MiB msgs"
        print(
            f"{what:<34}{row['payload_bytes']:>12}{row['median_s'] * 1e3:>12.3f}{row['gb_per_s']:>10.1f}{ratio:>8}"
        )
    return 0 if report["data_matches"] and set(report["receiver_states"]) == {"success"} else 1


def main() -> int:
    for key, value in SAFE_ENV.items():
        os.environ.setdefault(key, value)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--role", choices=["orchestrator", "sender", "receiver"], default="orchestrator")
    parser.add_argument("--store-port", type=int, default=0)
    parser.add_argument("--backend", choices=["nccl", "gloo"], default="nccl", help="gloo: CPU rehearsal")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--num-layers", type=int, default=32)
    parser.add_argument("--num-kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--num-blocks", type=int, default=128, help="2048 tokens / block size 16")
    parser.add_argument("--message-mib", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--raw-sizes-mib", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args()
    if args.role == "receiver":
        run_receiver(args)
        return 0
    if args.role == "sender":
        run_sender(args)
        return 0
    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
