"""Time to first token: prefill worker -> decode worker (KV over NCCL, separate processes and GPUs)
vs the aggregated engine on one GPU, same prompts, same run.

    python benchmarks/pd_ttft_bench.py --model dummy:llama-3.1-8b --prompt-len 2048 --out pd_ttft.json

On a CPU machine it runs the same way over gloo (``--prefill-device cpu --decode-device cpu``).
TTFT(P->D) is measured the way the router runs a request (P's PrefillStream starts, D's Reserve runs
beside it, the target follows by SetKVTarget) up to PrefillStream's first answer (the first token,
sampled on P; its KV may still be in flight), and also to the point where D holds the KV and its
Decode stream is open (``kv_landed``). The sequential flow (Reserve, then PrefillStream with the
target) is measured in the same run, the prompts taking the two flows in turn.
TTFT(aggregated) from submitting the request to its first sampled token. Prefix caching is defeated
with distinct prompts.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

SECRET = "pd-ttft-bench"


def start(role: str, model: str, device: str, extra: list[str]) -> tuple[subprocess.Popen, str]:
    env = dict(os.environ, BATON_SECRET=SECRET, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", f"{role}_worker", "--model", model, "--device", device, "--worker-id", f"{role}-bench", *extra],
        stdout=subprocess.PIPE, stderr=sys.stderr, text=True, env=env,
    )
    while True:
        line = proc.stdout.readline()
        if line.startswith("READY"):
            return proc, line.split()[1]
        if proc.poll() is not None or not line:
            raise RuntimeError(f"{role} worker failed to start")


def prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(10, vocab - 10) for _ in range(length)] for _ in range(n)]


FLOWS = ("follows", "reserve-first")  # the router's flow, and the sequential one it replaced


def ttft_disaggregated(
    model: str, pdev: str, ddev: str, ps: list[list[int]], max_len: int, chunk: int
) -> dict[str, tuple[list[float], list[dict]]]:
    """Per flow, TTFTs and where the time went, the prompts taking the flows in turn.

    ``follows`` (what the router does): P's PrefillStream starts (``kv_target_follows``), D's Reserve
    runs beside it, then SetKVTarget hands D's target to P; TTFT from the PrefillStream call.
    ``reserve-first``: Reserve, then PrefillStream with the target; TTFT from the Reserve call.
    """
    from baton.grpc_auth import auth_metadata  # noqa: F401  (import check before starting processes)
    from baton.pd_driver import PDDriver
    from baton.v1 import common_pb2, worker_pb2

    common = ["--max-model-len", str(max_len)]
    d, daddr = start("decode", model, ddev, common)
    p, paddr = start("prefill", model, pdev, [*common, "--chunk", str(chunk)])
    out: dict[str, tuple[list[float], list[dict]]] = {flow: ([], []) for flow in FLOWS}
    try:
        drv = PDDriver(paddr, daddr, SECRET, timeout_s=120)
        sp = common_pb2.SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
        for i, prompt in enumerate(ps):
            flow, rid = FLOWS[i % len(FLOWS)], f"r{i}"
            deadline_ms = int((time.time() + 120) * 1000)
            reserve = worker_pb2.ReserveRequest(
                request_id=rid, prompt_token_ids=prompt, sampling=sp, deadline_ms=deadline_ms
            )
            prefill = worker_pb2.PrefillRequest(
                request_id=rid, prompt_token_ids=prompt, sampling=sp, deadline_ms=deadline_ms
            )
            t0 = time.perf_counter()
            if flow == "follows":
                prefill.kv_target_follows = True
                answers = drv.prefill.PrefillStream(prefill, metadata=drv.md)  # P starts computing now
                reserved = drv.decode.Reserve(reserve, metadata=drv.md)
                assert reserved.HasField("handle"), reserved.error
                t1 = time.perf_counter()
                given = drv.prefill.SetKVTarget(
                    worker_pb2.SetKVTargetRequest(request_id=rid, kv_target=reserved.handle), metadata=drv.md
                )
                assert given.HasField("accepted"), given.error
            else:
                reserved = drv.decode.Reserve(reserve, metadata=drv.md)
                assert reserved.HasField("handle"), reserved.error
                t1 = time.perf_counter()
                prefill.kv_target.CopyFrom(reserved.handle)
                answers = drv.prefill.PrefillStream(prefill, metadata=drv.md)
            first_answer = next(answers)
            first = time.perf_counter()  # the client would have the first token now
            assert first_answer.HasField("result") and first_answer.result.kv_pending, first_answer
            pre = next(answers)
            assert pre.HasField("result") and not pre.result.kv_pending, pre
            decode = worker_pb2.DecodeRequest(request_id=rid, first_token_id=pre.result.first_token_id)
            stream = drv.decode.Decode(decode, metadata=drv.md)
            landed = time.perf_counter()  # D holds every KV block; its stream continues from the first token
            msgs = list(stream)
            assert not msgs[-1].HasField("error"), msgs[-1].error
            ttfts, parts = out[flow]
            ttfts.append(first - t0)
            # Where the time went: the Reserve round trip (beside the prefill in ``follows``), the
            # first answer, the KV landing on D, and the prefill worker's own account (admission to
            # first token, first KV piece sent to transfer SUCCESS).
            parts.append(
                {
                    "reserve_ms": 1e3 * (t1 - t0),
                    "first_answer_ms": 1e3 * (first - t0),
                    "kv_landed_ms": 1e3 * (landed - t0),
                    "p_prefill_ms": pre.result.prefill_ms,
                    "p_transfer_ms": pre.result.transfer_ms,
                }
            )
        return out
    finally:
        for proc in (p, d):
            proc.terminate()
            proc.wait(30)


def ttft_aggregated(model: str, device: str, ps: list[list[int]], max_len: int, chunk: int) -> list[float]:
    from engine.llm import LLM
    from engine.sampling.params import SamplingParams

    llm = LLM(model, device=device, max_model_len=max_len, max_num_batched_tokens=chunk)
    sp = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    out = []
    for i, prompt in enumerate(ps):
        t0 = time.perf_counter()
        req = llm.engine.add_request(f"a{i}", prompt, sp)
        while not req.output_token_ids:
            llm.engine.step()
        if device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()
        out.append(time.perf_counter() - t0)
        while not req.is_finished:
            llm.engine.step()
    del llm  # give the GPU back before the worker processes start on it
    import gc

    gc.collect()
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="dummy:llama-3.1-8b")
    ap.add_argument("--prompt-len", type=int, default=2048)
    ap.add_argument("--num", type=int, default=8)
    ap.add_argument("--chunk", type=int, default=2048, help="prefill chunk (tokens per step)")
    ap.add_argument("--prefill-device", default="cuda:0")
    ap.add_argument("--decode-device", default="cuda:1")
    ap.add_argument("--out", default="bench_results/pd_ttft.json")
    args = ap.parse_args()
    vocab = 32000
    max_len = args.prompt_len + 64
    warm = prompts(2 * len(FLOWS), args.prompt_len, vocab, seed=99)
    ps = prompts(args.num * len(FLOWS), args.prompt_len, vocab, seed=1)  # distinct: no prefix-cache hits
    agg = ttft_aggregated(args.model, args.prefill_device, warm[:2] + ps[: args.num], max_len, args.chunk)[2:]
    flows = ttft_disaggregated(
        args.model, args.prefill_device, args.decode_device, warm + ps, max_len, args.chunk
    )
    agg_ms = 1000 * statistics.median(agg)
    res = {
        "date": time.strftime("%Y-%m-%d"), "model": args.model, "prompt_len": args.prompt_len, "chunk": args.chunk,
        "devices": [args.prefill_device, args.decode_device], "aggregated_s": agg, "aggregated_median_ms": agg_ms,
        "flows": {},
    }  # fmt: skip
    for flow, (ttfts, parts) in flows.items():
        ttfts, parts = ttfts[2:], parts[2:]  # after the warm-ups
        median = 1000 * statistics.median(ttfts)
        res["flows"][flow] = {
            "disaggregated_s": ttfts,
            "disaggregated_median_ms": median,
            "ratio": median / agg_ms,
            "parts_median_ms": {k: statistics.median(p[k] for p in parts) for k in parts[0]},
        }
    res["ratio"] = res["flows"]["follows"]["ratio"]  # the router's flow
    try:
        import torch

        res["card"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    except Exception:
        res["card"] = "?"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2))
    print(f"\nTTFT, {args.model}, prompt {args.prompt_len} tokens, {res['card']}")
    print(f"aggregated (1 GPU)                   {agg_ms:8.1f} ms")
    for flow, r in res["flows"].items():
        landed = r["parts_median_ms"]["kv_landed_ms"]
        print(f"P -> D, {flow:14s} first token {r['disaggregated_median_ms']:8.1f} ms   ratio {r['ratio']:.3f}")
        print(f"P -> D, {flow:14s} KV on D     {landed:8.1f} ms   ratio {landed / agg_ms:.3f}")
        print("   parts (medians, ms): " + ", ".join(f"{k} {v:.1f}" for k, v in r["parts_median_ms"].items()))
    print(f"HEADLINE  TTFT P -> D as the router runs it: ratio {res['ratio']:.3f} (goal <= 1.10)")


if __name__ == "__main__":
    main()
