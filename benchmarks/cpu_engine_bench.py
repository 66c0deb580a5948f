"""CPU engine benchmark: Baton's engine vs HF transformers ``generate`` on the same weights, same process.

Workloads (issue "Engine core"): 32 concurrent requests (in 128 / out 64) against HF batch 32, and
batch-1 decode against HF batch 1, default model (SmolLM2-135M-Instruct), float32, greedy, ignore EOS.

    python benchmarks/cpu_engine_bench.py [--out bench_results/cpu_engine.json] [--dtype float32]

Prints a table last; writes full results as JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import time
from pathlib import Path

import torch

from engine.llm import LLM
from engine.sampling.params import SamplingParams
from engine.weights import load_weights


def prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab - 1) for _ in range(length)] for _ in range(n)]


def ours(llm: LLM, batch: list[list[int]], out_len: int, repeats: int) -> dict:
    sp = SamplingParams(max_tokens=out_len, temperature=0.0, ignore_eos=True)
    llm.generate(batch[:1], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))  # warm up
    times = []
    for _ in range(repeats):
        llm.engine.kv.pool.reset_prefix_cache()  # no cross-run cache hits: measure real prefill
        t = time.perf_counter()
        outs = llm.generate(batch, sp)
        times.append(time.perf_counter() - t)
        assert all(len(o.token_ids) == out_len for o in outs)
    med = statistics.median(times)
    return {"seconds": med, "output_tok_s": len(batch) * out_len / med, "runs": times}


def decode_only(llm: LLM, prompt: list[int], out_len: int) -> dict:
    """Batch-1 decode rate: time per token after the first (prefill excluded)."""
    eng = llm.engine
    req = eng.add_request("decode-rate", prompt, SamplingParams(max_tokens=out_len, temperature=0.0, ignore_eos=True))
    eng.step()  # prefill + first token
    t = time.perf_counter()
    while not req.is_finished:
        eng.step()
    dt = time.perf_counter() - t
    return {"decode_tok_s": (out_len - 1) / dt}


def hf(model, batch: list[list[int]], out_len: int, repeats: int) -> dict:
    ids = torch.tensor(batch)
    mask = torch.ones_like(ids)
    with torch.inference_mode():
        model.generate(ids[:1], attention_mask=mask[:1], max_new_tokens=4, do_sample=False, min_new_tokens=4, pad_token_id=0)
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            out = model.generate(ids, attention_mask=mask, max_new_tokens=out_len, min_new_tokens=out_len, do_sample=False, pad_token_id=0)
            times.append(time.perf_counter() - t)
            assert out.shape[1] == ids.shape[1] + out_len
    med = statistics.median(times)
    return {"seconds": med, "output_tok_s": len(batch) * out_len / med, "runs": times}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench_results/cpu_engine.json")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quantization", default=None, help="our engine only: none | int8 (weight-only)")
    ap.add_argument("--hf-dtype", default=None, help="HF's dtype (default: the same as ours)")
    args = ap.parse_args()
    from transformers import LlamaConfig, LlamaForCausalLM

    llm = LLM(dtype=args.dtype, device="cpu", max_num_batched_tokens=4096, max_num_seqs=64, quantization=args.quantization)
    dtype = llm.engine.config.dtype
    hf_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.hf_dtype] if args.hf_dtype else dtype
    weights = load_weights(llm.source, hf_dtype, "cpu")
    hf_model = LlamaForCausalLM(LlamaConfig(**weights.hf_config)).to(hf_dtype).eval()
    hf_model.load_state_dict(weights.tensors, strict=False)
    hf_model.tie_weights()
    vocab = llm.engine.config.model.vocab_size
    p32 = prompts(32, 128, vocab)
    p1 = prompts(1, 128, vocab, seed=1)
    res = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "model": llm.source.name,
        "dtype": str(dtype),
        "quantization": args.quantization or "none",
        "hf_dtype": str(hf_dtype),
        "batch32_in128_out64": {"baton": ours(llm, p32, 64, args.repeats), "hf": hf(hf_model, p32, 64, args.repeats)},
        "batch1_in128_out64": {"baton": ours(llm, p1, 64, args.repeats), "hf": hf(hf_model, p1, 64, args.repeats)},
        "batch1_decode_rate": decode_only(llm, p1[0], 128),
    }
    for k in ("batch32_in128_out64", "batch1_in128_out64"):
        res[k]["ratio"] = res[k]["baton"]["output_tok_s"] / res[k]["hf"]["output_tok_s"]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2))
    print(f"\n{res['machine']} · {res['model']} · ours {res['dtype']} (quantization {res['quantization']}) · HF {res['hf_dtype']}")
    print(f"{'workload':<26}{'Baton tok/s':>14}{'HF tok/s':>12}{'ratio':>8}")
    for k in ("batch32_in128_out64", "batch1_in128_out64"):
        r = res[k]
        print(f"{k:<26}{r['baton']['output_tok_s']:>14.1f}{r['hf']['output_tok_s']:>12.1f}{r['ratio']:>8.2f}")
    print(f"{'batch-1 decode only':<26}{res['batch1_decode_rate']['decode_tok_s']:>14.1f}")


if __name__ == "__main__":
    main()
