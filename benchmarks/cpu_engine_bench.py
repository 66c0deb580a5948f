"""CPU engine benchmark: Baton's engine vs HF transformers ``generate`` on the same weights, same process.

Workloads (issue "Engine core"): 32 concurrent requests (in 128 / out 64) against HF batch 32, and
batch-1 decode against HF batch 1, default model (SmolLM2-135M-Instruct), greedy, ignore EOS.

    python benchmarks/cpu_engine_bench.py [--out bench_results/cpu_engine.json]
    python benchmarks/cpu_engine_bench.py --quantization int4     # ours: Q4_1 weights, bf16 compute

HF runs in float32 (its default) and, when our engine computes in another precision, also in that
precision (e.g. bf16 for ``--quantization int4``), in the same run, so both ratios are shown.
Every figure is the median of ``--repeats`` runs. Prints a table last; writes full results as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import time
from pathlib import Path

import torch

from engine.llm import LLM
from engine.sampling.params import SamplingParams
from engine.weights import load_weights

WORKLOADS = ("batch32_in128_out64", "batch1_in128_out64")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab - 1) for _ in range(length)] for _ in range(n)]


def run_ours(llm: LLM, batch: list[list[int]], out_len: int) -> float:
    sp = SamplingParams(max_tokens=out_len, temperature=0.0, ignore_eos=True)
    llm.engine.kv.pool.reset_prefix_cache()  # no cross-run cache hits: measure real prefill
    t = time.perf_counter()
    outs = llm.generate(batch, sp)
    seconds = time.perf_counter() - t
    assert all(len(o.token_ids) == out_len for o in outs)
    return seconds


def run_hf(model, batch: list[list[int]], out_len: int) -> float:
    ids = torch.tensor(batch)
    mask = torch.ones_like(ids)
    with torch.inference_mode():
        t = time.perf_counter()
        out = model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=out_len,
            min_new_tokens=out_len,
            do_sample=False,
            pad_token_id=0,
        )
        seconds = time.perf_counter() - t
    assert out.shape[1] == ids.shape[1] + out_len
    return seconds


def summary(times: list[float], num_tokens: int) -> dict:
    med = statistics.median(times)
    return {"seconds": med, "output_tok_s": num_tokens / med, "runs": times}


def decode_only(llm: LLM, prompt: list[int], out_len: int, repeats: int) -> dict:
    """Batch-1 decode rate: time per token after the first (prefill excluded), median of runs."""
    eng = llm.engine
    rates = []
    for i in range(repeats):
        sp = SamplingParams(max_tokens=out_len, temperature=0.0, ignore_eos=True)
        req = eng.add_request(f"decode-rate-{i}", prompt, sp)
        eng.step()  # prefill + first token
        t = time.perf_counter()
        while not req.is_finished:
            eng.step()
        rates.append((out_len - 1) / (time.perf_counter() - t))
    return {"decode_tok_s": statistics.median(rates), "runs": rates}


def hf_model(llm: LLM, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    weights = load_weights(llm.source, dtype, "cpu")
    model = LlamaForCausalLM(LlamaConfig(**weights.hf_config)).to(dtype).eval()
    model.load_state_dict(weights.tensors, strict=False)
    model.tie_weights()
    return model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench_results/cpu_engine.json")
    ap.add_argument("--dtype", default="auto", help="ours: float32 | bfloat16 | auto (fp32; bf16 with int4)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quantization", default=None, help="ours only: none | int8 | int4 (weight-only)")
    ap.add_argument("--hf-dtypes", default=None, help="comma list; default float32, plus ours if different")
    args = ap.parse_args()

    load_start = time.perf_counter()
    llm = LLM(
        dtype=args.dtype,
        device="cpu",
        max_num_batched_tokens=4096,
        max_num_seqs=64,
        quantization=args.quantization,
    )
    load_seconds = time.perf_counter() - load_start
    dtype = llm.engine.config.dtype
    hf_names = args.hf_dtypes.split(",") if args.hf_dtypes else ["float32"]
    if not args.hf_dtypes and dtype != torch.float32:
        hf_names.append({v: k for k, v in DTYPES.items()}[dtype])
    vocab = llm.engine.config.model.vocab_size
    batches = {WORKLOADS[0]: prompts(32, 128, vocab), WORKLOADS[1]: prompts(1, 128, vocab, seed=1)}
    hf_models = {n: hf_model(llm, DTYPES[n]) for n in hf_names}
    load_before = os.getloadavg()
    res = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "model": llm.source.name,
        "dtype": str(dtype),
        "quantization": args.quantization or "none",
        "engine_load_seconds": load_seconds,
        "repeats": args.repeats,
    }
    # Warm up every system, then interleave their runs, so a slow phase of a shared machine
    # falls on all of them rather than on one.
    run_ours(llm, batches[WORKLOADS[1]], 4)
    for model in hf_models.values():
        run_hf(model, batches[WORKLOADS[1]], 4)
    for name, batch in batches.items():
        times: dict[str, list[float]] = {"baton": [], **{f"hf_{n}": [] for n in hf_names}}
        for _ in range(args.repeats):
            times["baton"].append(run_ours(llm, batch, 64))
            for n, model in hf_models.items():
                times[f"hf_{n}"].append(run_hf(model, batch, 64))
        res[name] = {system: summary(t, len(batch) * 64) for system, t in times.items()}
        for n in hf_names:
            res[name][f"ratio_vs_hf_{n}"] = (
                res[name]["baton"]["output_tok_s"] / res[name][f"hf_{n}"]["output_tok_s"]
            )
    res["batch1_decode_rate"] = decode_only(llm, batches[WORKLOADS[1]][0], 128, args.repeats)
    res["loadavg_before_after"] = [load_before, os.getloadavg()]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2))

    print(f"\n{res['machine']} · {res['model']} · ours {res['dtype']} (quantization {res['quantization']})")
    print(
        f"medians of {args.repeats} · load average before/after: {load_before[0]:.2f} / {os.getloadavg()[0]:.2f}"
    )
    header = f"{'workload':<26}{'Baton tok/s':>13}"
    for hf_name in hf_names:
        header += f"{'HF ' + hf_name:>16}{'ratio':>8}"
    print(header)
    for name in WORKLOADS:
        r = res[name]
        line = f"{name:<26}{r['baton']['output_tok_s']:>13.1f}"
        for hf_name in hf_names:
            line += f"{r[f'hf_{hf_name}']['output_tok_s']:>16.1f}{r[f'ratio_vs_hf_{hf_name}']:>8.2f}"
        print(line)
    print(f"{'batch-1 decode only':<26}{res['batch1_decode_rate']['decode_tok_s']:>13.1f}")


if __name__ == "__main__":
    main()
