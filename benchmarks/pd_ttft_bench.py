"""Time to first token: prefill worker -> decode worker (KV over NCCL, separate processes and GPUs)
vs the aggregated engine on one GPU, same prompts, same run.

    python benchmarks/pd_ttft_bench.py --model dummy:llama-3.1-8b --prompt-len 2048 --out pd_ttft.json

On a CPU machine it runs the same way over gloo (``--prefill-device cpu --decode-device cpu``).
TTFT(P->D) is measured the way the router streams it: from Reserve to PrefillStream's first answer
(the first token, sampled on P; its KV may still be in flight), and also to the point where D holds
the KV and its Decode stream is open (``kv_landed``, the unary Prefill's TTFT before PrefillStream).
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


def ttft_disaggregated(model: str, pdev: str, ddev: str, ps: list[list[int]], max_len: int, chunk: int) -> list[float]:
    from baton.grpc_auth import auth_metadata  # noqa: F401  (import check before starting processes)
    from baton.pd_driver import PDDriver
    from baton.v1 import common_pb2, worker_pb2

    common = ["--max-model-len", str(max_len)]
    d, daddr = start("decode", model, ddev, common)
    p, paddr = start("prefill", model, pdev, [*common, "--chunk", str(chunk)])
    try:
        drv = PDDriver(paddr, daddr, SECRET, timeout_s=120)
        sp = common_pb2.SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
        out, parts = [], []
        for i, prompt in enumerate(ps):
            t0 = time.perf_counter()
            deadline_ms = int((time.time() + 120) * 1000)
            reserved = drv.decode.Reserve(worker_pb2.ReserveRequest(request_id=f"r{i}", prompt_token_ids=prompt, sampling=sp, deadline_ms=deadline_ms), metadata=drv.md)
            assert reserved.HasField("handle"), reserved.error
            t1 = time.perf_counter()
            answers = drv.prefill.PrefillStream(worker_pb2.PrefillRequest(request_id=f"r{i}", prompt_token_ids=prompt, sampling=sp, kv_target=reserved.handle, deadline_ms=deadline_ms), metadata=drv.md)
            first_answer = next(answers)
            first = time.perf_counter()  # the client would have the first token now
            assert first_answer.HasField("result") and first_answer.result.kv_pending, first_answer
            pre = next(answers)
            assert pre.HasField("result") and not pre.result.kv_pending, pre
            stream = drv.decode.Decode(worker_pb2.DecodeRequest(request_id=f"r{i}", first_token_id=pre.result.first_token_id), metadata=drv.md)
            landed = time.perf_counter()  # D holds every KV block; its stream continues from the first token
            msgs = list(stream)
            assert not msgs[-1].HasField("error"), msgs[-1].error
            out.append(first - t0)
            # Where the time went: the Reserve round trip, PrefillStream's first answer, the wait for the
            # KV to land after it, and the prefill worker's own account (admission to first token,
            # first KV piece sent to transfer SUCCESS).
            parts.append({"reserve_ms": 1e3 * (t1 - t0), "first_answer_ms": 1e3 * (first - t1),
                          "kv_landed_ms": 1e3 * (landed - t0),
                          "p_prefill_ms": pre.result.prefill_ms, "p_transfer_ms": pre.result.transfer_ms})
        return out, parts
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
    warm = prompts(2, args.prompt_len, vocab, seed=99)
    ps = prompts(args.num, args.prompt_len, vocab, seed=1)
    agg = ttft_aggregated(args.model, args.prefill_device, warm + ps, max_len, args.chunk)[len(warm):]
    dis, parts = ttft_disaggregated(args.model, args.prefill_device, args.decode_device, warm + ps, max_len, args.chunk)
    dis, parts = dis[len(warm):], parts[len(warm):]
    res = {
        "date": time.strftime("%Y-%m-%d"), "model": args.model, "prompt_len": args.prompt_len, "chunk": args.chunk,
        "devices": [args.prefill_device, args.decode_device], "aggregated_s": agg, "disaggregated_s": dis,
        "aggregated_median_ms": 1000 * statistics.median(agg), "disaggregated_median_ms": 1000 * statistics.median(dis),
        "disaggregated_parts_median_ms": {k: statistics.median(p[k] for p in parts) for k in parts[0]},
    }
    res["ratio"] = res["disaggregated_median_ms"] / res["aggregated_median_ms"]
    try:
        import torch

        res["card"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    except Exception:
        res["card"] = "?"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2))
    print(f"\nTTFT, {args.model}, prompt {args.prompt_len} tokens, {res['card']}")
    print(f"aggregated (1 GPU)   {res['aggregated_median_ms']:8.1f} ms")
    print(f"P -> D (2 GPUs)      {res['disaggregated_median_ms']:8.1f} ms   ratio {res['ratio']:.3f}   (first token streamed from P)")
    landed = res["disaggregated_parts_median_ms"]["kv_landed_ms"]
    print(f"P -> D, KV on D      {landed:8.1f} ms   ratio {landed / res['aggregated_median_ms']:.3f}")
    print("P -> D parts (medians, ms): " + ", ".join(f"{k} {v:.1f}" for k, v in res["disaggregated_parts_median_ms"].items()))


if __name__ == "__main__":
    main()
