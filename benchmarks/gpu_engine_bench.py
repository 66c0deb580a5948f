"""End-to-end GPU benchmark: our engine next to HF transformers on the same card, the same random
weights and the same prompts. One command, a table and JSON.

    python benchmarks/gpu_engine_bench.py [--models llama-3.2-1b,llama-3.1-8b] [--out FILE.json]
                                          [--skip-hf] [--skip-compile] [--time-budget SECONDS]

Measures, in one run:
  * ceilings: device-to-device copy of 4 GiB (bytes read + written), bf16 8192^3 matmul;
  * per model shape (dummy weights, bf16):
      - batch 1 (prompt 32, 128 new tokens, EOS ignored): our decode tok/s and its share of the
        decode roofline = copy bandwidth / (weight bytes read per token + KV bytes read per token);
        HF eager; HF static cache + torch.compile (``cache_implementation="static"``);
      - 64 concurrent requests (prompt 1024, 128 new tokens): output tok/s (all output tokens over
        the wall time from submission to the last token) for ours, HF eager at batch 64, HF
        continuous batching (``generate_batch``, when installed) and HF static + compile batch 64.
HF modes that fail are recorded with their error, never replaced by a guess. Results are written
after every section, so a run stopped by a time limit keeps what it measured.
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import logging
import random
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.builder import build_engine  # noqa: E402
from engine.config import CacheConfig, ModelConfig, SchedulerConfig  # noqa: E402
from engine.sampling.params import SamplingParams  # noqa: E402
from engine.weights import dummy_weights  # noqa: E402

GIB = 1 << 30
DTYPE = torch.bfloat16


# --- ceilings --------------------------------------------------------------------------------
def _median_ms(fn, reps: int = 20, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _copy_gbs(nbytes: int = 4 * GIB) -> float:
    src = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * nbytes / _median_ms(lambda: dst.copy_(src)) / 1e6  # bytes read + written


def _matmul_tflops(n: int = 8192) -> float:
    a = torch.randn(n, n, dtype=DTYPE, device="cuda")
    b = torch.randn(n, n, dtype=DTYPE, device="cuda")
    return 2 * n**3 / _median_ms(lambda: a @ b) / 1e9


def ceilings() -> dict:
    out = {"copy_GBps": _copy_gbs(), "matmul_bf16_TFLOPs": _matmul_tflops()}
    torch.cuda.empty_cache()
    return out


# --- workloads -------------------------------------------------------------------------------
def random_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(10, vocab - 10) for _ in range(length)] for _ in range(n)]


def roofline(cfg: ModelConfig, model: torch.nn.Module, copy_gbs: float, prompt: int, new: int) -> dict:
    """Batch-1 decode roofline: every weight read once per token (an untied input embedding only
    contributes one row, so it is left out) plus the KV of the mean context."""
    params = {id(p): p for p in model.parameters()}
    param_bytes = sum(p.numel() * p.element_size() for p in params.values())
    embed = model.embed_tokens.weight
    read_bytes = param_bytes - (0 if cfg.tie_word_embeddings else embed.numel() * embed.element_size())
    kv_per_token = cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * embed.element_size()
    kv_bytes = kv_per_token * (prompt + new / 2)
    return {
        "param_bytes": param_bytes,
        "weight_bytes_read_per_token": read_bytes,
        "kv_bytes_read_per_token": kv_bytes,
        "roofline_tok_s": copy_gbs * 1e9 / (read_bytes + kv_bytes),
        # The convention of the project's issue: all parameters at 2 bytes, KV ignored.
        "roofline_all_params_tok_s": copy_gbs * 1e9 / param_bytes,
    }


def run_ours(engine, prompts: list[list[int]], new: int, tag: str) -> dict:
    """Submit every prompt at once, step to completion; token times are host times after each
    step, which ends with the sampler's device->host copy (so they are synchronised)."""
    sampling = SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for i, p in enumerate(prompts):
        engine.add_request(f"{tag}-{i}", p, sampling)
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    counts: dict[str, int] = {}
    while engine.has_unfinished():
        outs = engine.step()
        now = time.perf_counter()
        for o in outs:
            first.setdefault(o.request_id, now)
            last[o.request_id] = now
            counts[o.request_id] = counts.get(o.request_id, 0) + len(o.new_token_ids)
    wall = time.perf_counter() - start
    assert all(c == new for c in counts.values()) and len(counts) == len(prompts), counts
    decode_s = statistics.median(last[r] - first[r] for r in first)
    return {
        "wall_s": wall,
        "output_tok_s": len(prompts) * new / wall,
        "decode_tok_s_per_seq": (new - 1) / decode_s if decode_s > 0 else float("nan"),
        "ttft_s_median": statistics.median(first[r] - start for r in first),
    }


def step_phases(engine, prompt: list[int], new: int) -> dict:
    """Median per decode step of a batch-1 generation: host time of scheduling, of the runner's
    graph launch (packing, upload, replay call), of sampling (which waits for the device), of the
    engine's update; and device time from the upload to the end of the graph."""
    runner, phases, events = engine.runner, {}, []

    def timed(fn, key, with_events=False):
        def wrapper(*a, **k):
            start = time.perf_counter()
            if with_events:
                begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                begin.record()
            out = fn(*a, **k)
            if with_events:
                end.record()
                events.append((begin, end))
            phases.setdefault(key, []).append(time.perf_counter() - start)
            return out

        return wrapper

    saved = (runner.graphs.run, engine.scheduler.schedule, engine._update, runner.sampler, engine.step)
    runner.graphs.run = timed(saved[0], "graph_launch_host", with_events=True)
    engine.scheduler.schedule = timed(saved[1], "schedule")
    engine._update = timed(saved[2], "update")
    runner.sampler = timed(saved[3], "sample_incl_wait")
    engine.step = timed(saved[4], "step_total")
    try:
        run_ours(engine, [prompt], new, "phases")
    finally:
        runner.graphs.run = saved[0]
        engine.scheduler.schedule, engine._update, runner.sampler = saved[1:4]
        del engine.step
    torch.cuda.synchronize()
    out = {f"{k}_us": 1e6 * statistics.median(v[1:]) for k, v in phases.items() if len(v) > 1}
    out["device_step_us"] = 1e3 * statistics.median(b.elapsed_time(e) for b, e in events[1:])
    return out


def launch_costs(engine) -> dict:
    """Host cost of a graph step (median of 50) at batch 1 and 64: ``DecodeGraphs.run`` (packing
    into pinned memory + the graph launch), and the whole step up to the greedy token on the host.
    Writes KV into the first blocks of the cache: run it only on an engine about to be discarded."""
    graphs = engine.runner.graphs
    out = {"upload_in_graph": graphs.upload_in_graph}
    for n in (1, 64):
        blocks = [list(range(i * 40, i * 40 + 40)) for i in range(n)]
        tokens, positions = [1] * n, [500] * n
        launch, step = [], []
        for _ in range(50):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            logits = graphs.run(tokens, positions, blocks)
            t1 = time.perf_counter()
            logits.argmax(-1).tolist()
            launch.append(t1 - t0)
            step.append(time.perf_counter() - t0)
        out[f"batch{n}"] = {
            "run_host_us": 1e6 * statistics.median(launch),
            "step_to_host_token_us": 1e6 * statistics.median(step),
        }
    x = torch.zeros(1, device="cuda")
    tiny = torch.cuda.CUDAGraph()
    with torch.cuda.graph(tiny):
        x.add_(1)
    calls = []
    for _ in range(50):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        tiny.replay()
        calls.append(time.perf_counter() - t0)
    out["one_kernel_graph_launch_us"] = 1e6 * statistics.median(calls)
    return out


def kernel_profile(engine, reps: int = 20) -> dict:
    """Device time of the kernels of one batch-1 decode graph replay, by kernel name (torch.profiler;
    CUPTI traces the kernels inside a graph): the 25 largest and the sum of all, in microseconds per
    replay. Run after ``decode_breakdown`` has filled the graph's inputs."""
    from torch.profiler import ProfilerActivity, profile

    graph = engine.runner.graphs.graphs[1][0]
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            graph.replay()
        torch.cuda.synchronize()
    rows = []
    for event in prof.key_averages():
        us = getattr(event, "self_device_time_total", None)
        if us is None:
            us = getattr(event, "self_cuda_time_total", 0)
        if us > 0:
            rows.append(
                {"kernel": event.key[:120], "us_per_step": us / reps, "calls_per_step": event.count / reps}
            )
    rows.sort(key=lambda r: -r["us_per_step"])
    return {"sum_us_per_step": sum(r["us_per_step"] for r in rows), "top": rows[:25]}


def decode_breakdown(engine) -> dict:
    """Device time of one batch-1 decode graph replay (no host work), the phases of engine steps,
    and the host cost of a graph step. Writes KV: run it only on an engine about to be discarded."""
    out = {
        "phases": step_phases(
            engine, random_prompts(1, 32, engine.runner.model.config.vocab_size, 99)[0], 128
        )
    }
    out["launch_costs"] = launch_costs(engine)
    graphs = engine.runner.graphs
    graphs.run([1], [500], [list(range(40))])  # valid batch-1 inputs for the replays below
    out["graph_replay_ms"] = _median_ms(graphs.graphs[1][0].replay, reps=50)
    try:
        out["kernels"] = kernel_profile(engine)
    except Exception as exc:  # diagnostics only
        out["kernels"] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
    return out


# --- HF transformers peers -------------------------------------------------------------------
def hf_model(hf_config: dict, tensors: dict[str, torch.Tensor]):
    """HF's Llama built from the same config, sharing our dummy tensors (no copy). Parameters are
    created in bf16 (default dtype), HF's rotary inv_freq stays fp32 as when HF loads a checkpoint."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(**hf_config)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(DTYPE)
    try:
        with torch.device("cuda"):
            model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    finally:
        torch.set_default_dtype(previous)
    missing, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
        missing = [m for m in missing if m != "lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(f"HF weights mismatch: missing {missing[:4]}, unexpected {unexpected[:4]}")
    return model.eval()


@torch.inference_mode()
def hf_generate(model, prompts: list[list[int]], new: int, **kw) -> dict:
    ids = torch.tensor(prompts, device="cuda")
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
        eos_token_id=None, pad_token_id=0, **kw,
    )  # fmt: skip
    torch.cuda.synchronize()
    wall = time.perf_counter() - start
    generated = out.shape[1] - ids.shape[1]
    return {"wall_s": wall, "generated": generated, "output_tok_s": len(prompts) * generated / wall}


def hf_continuous_batching(model, prompts: list[list[int]], new: int) -> dict:
    """``generate_batch`` (HF's continuous batching). Throughput is timed from the first request's
    creation to the last one's finish, which leaves the manager's start-up (graph warm-up) out."""
    from transformers import GenerationConfig

    if not hasattr(model, "generate_batch"):
        raise RuntimeError("this transformers has no generate_batch")
    config = GenerationConfig(max_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0)
    kwargs = (
        {"progress_bar": False}
        if "progress_bar" in inspect.signature(model.generate_batch).parameters
        else {}
    )
    torch.cuda.synchronize()
    start = time.perf_counter()
    results = model.generate_batch(inputs=prompts, generation_config=config, **kwargs)
    wall = time.perf_counter() - start
    outs = list(results.values())
    generated = sum(len(o.generated_tokens) for o in outs)
    errors = [o.error for o in outs if getattr(o, "error", None)]
    row = {
        "wall_s": wall,
        "generated": generated,
        "output_tok_s_wall": generated / wall,
        "errors": errors[:3],
    }
    try:
        span = max(o.lifespan[1] for o in outs) - min(o.created_time for o in outs)
        row["span_s"] = span
        row["output_tok_s"] = generated / span if span > 0 else row["output_tok_s_wall"]
    except (AttributeError, TypeError, ValueError):
        row["output_tok_s"] = row["output_tok_s_wall"]
    return row


def attempt(name: str, fn, results: dict, deadline: float) -> dict | None:
    if time.perf_counter() > deadline:
        results[name] = {"skipped": "time budget"}
        return None
    try:
        results[name] = fn()
    except Exception as exc:  # a peer that fails is recorded as failed, never faked
        results[name] = {
            "error": f"{type(exc).__name__}: {exc}"[:500],
            "trace": traceback.format_exc()[-1500:],
        }
        gc.collect()
        torch.cuda.empty_cache()
    print(f"  {name}: {json.dumps(results[name], default=str)[:300]}", flush=True)
    return results[name]


# --- one model shape -------------------------------------------------------------------------
def bench_model(res: dict, args, copy_gbs: float, save) -> None:
    """Fills ``res`` (already part of the saved results) section by section."""
    shape = res["shape"]
    weights = dummy_weights(shape, DTYPE, "cuda", seed=0)
    cfg = ModelConfig.from_hf_dict(weights.hf_config)
    vocab = cfg.vocab_size
    b1_prompt, b1_new = 32, 128
    c_n, c_prompt, c_new = args.concurrency, 1024, 128

    start = time.perf_counter()
    engine = build_engine(
        weights.hf_config, weights.tensors, dtype=DTYPE, device="cuda",
        cache=CacheConfig(block_size=16, gpu_memory_utilization=args.gpu_memory_utilization, layout=args.kv_layout),
        scheduler=SchedulerConfig(max_num_seqs=c_n, max_num_batched_tokens=args.max_num_batched_tokens),
        max_model_len=args.max_model_len,
    )  # fmt: skip
    res["ours_build_s"] = time.perf_counter() - start
    res["ours_kv_blocks"] = engine.config.cache.num_blocks
    res["ours_graph_capture_s"] = engine.runner.capture_cuda_graphs(c_n)
    res["roofline"] = roofline(cfg, engine.runner.model, copy_gbs, b1_prompt, b1_new)
    print(
        f"[{shape}] built in {res['ours_build_s']:.1f}s, graphs {res['ours_graph_capture_s']:.1f}s",
        flush=True,
    )

    run_ours(engine, random_prompts(1, b1_prompt, vocab, seed=1), b1_new, "warm1")
    runs = [
        run_ours(engine, random_prompts(1, b1_prompt, vocab, seed=10 + i), b1_new, f"b1-{i}")
        for i in range(3)
    ]
    best = sorted(runs, key=lambda r: r["decode_tok_s_per_seq"])[1]  # the median run
    roof = res["roofline"]
    res["ours_batch1"] = best | {
        "runs_decode_tok_s": [r["decode_tok_s_per_seq"] for r in runs],
        "pct_roofline": 100 * best["decode_tok_s_per_seq"] / roof["roofline_tok_s"],
        "pct_roofline_all_params": 100 * best["decode_tok_s_per_seq"] / roof["roofline_all_params_tok_s"],
    }
    print(f"  ours batch 1: {json.dumps(res['ours_batch1'])}", flush=True)
    save()
    if "concurrent" in args.workloads:
        run_ours(engine, random_prompts(c_n, c_prompt, vocab, seed=2), c_new, "warm64")
        res["ours_concurrent"] = run_ours(engine, random_prompts(c_n, c_prompt, vocab, seed=3), c_new, "c")
        print(f"  ours {c_n} concurrent: {json.dumps(res['ours_concurrent'])}", flush=True)
        save()
    if args.profile:
        try:
            res["ours_breakdown"] = decode_breakdown(engine)
        except Exception as exc:  # diagnostics only: never lose the measurements above
            res["ours_breakdown"] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
        print(f"  breakdown: {json.dumps(res['ours_breakdown'])}", flush=True)
        save()
    del engine
    gc.collect()
    torch.cuda.empty_cache()
    if args.skip_hf or (args.hf_models and shape not in args.hf_models.split(",")):
        return

    bench_hf(res, hf_model(weights.hf_config, weights.tensors), weights.hf_config, args, save)
    gc.collect()
    torch.cuda.empty_cache()


def bench_hf(res: dict, model, hf_config: dict, args, save) -> None:
    deadline = args.deadline
    vocab = hf_config["vocab_size"]
    b1_prompt, b1_new = 32, 128
    c_n, c_prompt, c_new = args.concurrency, 1024, 128
    res["hf_rotary_inv_freq_dtype"] = str(model.model.rotary_emb.inv_freq.dtype)
    b1 = random_prompts(1, b1_prompt, vocab, seed=10)
    conc = random_prompts(c_n, c_prompt, vocab, seed=3)
    hf_generate(model, b1, 4)  # warm-up
    attempt("hf_eager_batch1", lambda: hf_generate(model, b1, b1_new), res, deadline)
    save()
    attempt(f"hf_eager_batch{c_n}", lambda: hf_generate(model, conc, c_new), res, deadline)
    save()
    if not args.skip_compile:
        attempt("hf_continuous_batching", lambda: hf_continuous_batching(model, conc, c_new), res, deadline)
        save()

        def static_compiled(prompts, new):
            t0 = time.perf_counter()
            first = hf_generate(model, prompts, new, cache_implementation="static")
            timed = hf_generate(model, prompts, new, cache_implementation="static")
            return timed | {"first_call_s": first["wall_s"], "total_s": time.perf_counter() - t0}

        attempt("hf_static_compile_batch1", lambda: static_compiled(b1, b1_new), res, deadline)
        save()
        attempt(f"hf_static_compile_batch{c_n}", lambda: static_compiled(conc, c_new), res, deadline)
        save()


def _tok_s(row: dict | None) -> float | None:
    return row.get("output_tok_s") if isinstance(row, dict) else None


def summarize(res: dict, c_n: int) -> list[str]:
    lines = []
    b1 = res.get("ours_batch1", {})
    roof = res.get("roofline", {})
    hf1 = {k: _tok_s(res.get(k)) for k in ("hf_eager_batch1", "hf_static_compile_batch1")}
    lines.append(
        f"{res['shape']:<14} batch 1  ours {b1.get('decode_tok_s_per_seq', float('nan')):8.1f} tok/s "
        f"= {b1.get('pct_roofline', float('nan')):5.1f}% of roofline {roof.get('roofline_tok_s', 0):7.1f} "
        f"({b1.get('pct_roofline_all_params', float('nan')):5.1f}% of all-params roofline "
        f"{roof.get('roofline_all_params_tok_s', 0):7.1f})"
    )
    phases = res.get("ours_breakdown", {}).get("phases", {})
    if phases:
        lines.append(
            f"{'':<14}          engine step {phases['step_total_us']:7.0f} us, of which the batch-1 graph "
            f"{1e3 * res['ours_breakdown']['graph_replay_ms']:7.0f} us on the device"
        )
    if b1:
        lines.append(f"{'':<14}          ours end to end (prefill incl.) {b1['output_tok_s']:8.1f} tok/s")
    for k, v in hf1.items():
        if v:
            lines.append(
                f"{'':<14}          {k:<28} {v:8.1f} tok/s   ours/HF (end to end) {b1['output_tok_s'] / v:6.1f}x"
            )
    ours_c = _tok_s(res.get("ours_concurrent"))
    peers = {
        k: _tok_s(res.get(k))
        for k in (f"hf_eager_batch{c_n}", "hf_continuous_batching", f"hf_static_compile_batch{c_n}")
    }
    if ours_c:
        lines.append(f"{'':<14} {c_n} conc  ours {ours_c:8.1f} output tok/s")
        for k, v in peers.items():
            if v:
                lines.append(f"{'':<14}          {k:<28} {v:8.1f} tok/s   ours/HF {ours_c / v:6.1f}x")
        valid = [v for v in peers.values() if v]
        missing = [k for k, v in peers.items() if not v]
        if valid:
            note = f" (not measured: {', '.join(missing)})" if missing else ""
            lines.append(f"{'':<14}          vs best measured HF mode: {ours_c / max(valid):.2f}x{note}")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="llama-3.2-1b,llama-3.1-8b")
    ap.add_argument("--out", default="bench_results/gpu_engine.json")
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.90)
    ap.add_argument("--kv-layout", default="auto", choices=["auto", "block-major", "layer-major"], help="how the KV cache is stored")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--hf-models", default="", help="run the HF peers only for these shapes (default: all)")
    ap.add_argument("--profile", action="store_true", help="time the parts of a decode step (diagnostics)")
    ap.add_argument(
        "--workloads",
        default="batch1,concurrent",
        help="which of ours to run: batch1 always, concurrent optional",
    )
    ap.add_argument(
        "--skip-compile", action="store_true", help="skip HF static+compile and continuous batching"
    )
    ap.add_argument(
        "--time-budget", type=float, default=1e9, help="seconds; later HF modes are skipped after it"
    )
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    args.deadline = time.perf_counter() + args.time_budget
    import transformers
    import triton

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    props = torch.cuda.get_device_properties(0)
    results: dict = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "device": props.name,
        "versions": {
            "torch": torch.__version__,
            "triton": triton.__version__,
            "transformers": transformers.__version__,
        },
        "command": " ".join(sys.argv),
        "models": {},
    }

    def save() -> None:
        out.write_text(json.dumps(results, indent=2, default=str))

    results["ceilings"] = ceilings()
    print(f"{props.name}: {json.dumps(results['ceilings'])}", flush=True)
    save()
    for shape in [m for m in args.models.split(",") if m]:
        results["models"][shape] = {"shape": shape}
        try:
            bench_model(results["models"][shape], args, results["ceilings"]["copy_GBps"], save)
        except Exception as exc:
            results["models"][shape]["error"] = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
        save()
        gc.collect()
        torch.cuda.empty_cache()

    c = results["ceilings"]
    print(
        f"\n{props.name}  copy {c['copy_GBps']:.0f} GB/s  bf16 matmul {c['matmul_bf16_TFLOPs']:.0f} TFLOP/s"
    )
    for res in results["models"].values():
        if "error" in res:
            print(f"{res['shape']}: ERROR {res['error']}")
        print("\n".join(summarize(res, args.concurrency)))
    print(f"\nresults: {out}")


if __name__ == "__main__":
    main()
