"""Speculative decoding on the real default model (SmolLM2-135M-Instruct), baseline in the same run.

    python benchmarks/spec_decode_bench.py --out bench_results/spec_decode_cpu.json

1. **Batch 1, n-gram, copy-heavy** ("Rewrite the following text, fixing typos: <three paragraphs>"),
   greedy until EOS: decode tokens/s without speculation and with the n-gram proposer under the
   adaptive policy (and with a fixed k, for reference); runs alternate, ``--reps`` times each; the
   outputs must be token-identical. Decode time runs from the first token to the last (the prompt's
   prefill is the same for both and is left out).
2. **64 concurrent requests** (distinct copy-heavy prompts, all admitted at once, prefix cache reset
   before each run): output tokens/s over the whole run, no speculation vs the adaptive policy (and a
   fixed k = 8 without the policy, to show what the policy prevents).
3. **Draft model** = the default model as its own draft (no smaller sibling exists offline): acceptance
   rate, mean tokens per verification, time of a draft forward and of a verification step, and the
   draft's catch-up prefill of a prompt on a decode worker (what a request arriving with its target KV
   from a prefill worker costs there), next to the target's prefill of the same prompt.

Prints a table and writes every number as JSON. The machine's load average is recorded before and
after: on a shared machine, compare only numbers of the same run.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.llm import LLM  # noqa: E402
from engine.request import Request, RequestStatus  # noqa: E402
from engine.sampling.params import SamplingParams  # noqa: E402
from engine.spec_decode import SpecConfig, SpecDecodeMetrics, build_spec_decoder, load_draft_engine  # noqa: E402

PARAGRAPHS = [
    "The town of Millbrook sits at the edge of a wide valley, where the river bends twice before it "
    "reaches the sea. Every spring the farmers plant barley and oats in the low fields, and every autumn "
    "the whole town gathers for the harvest fair. The fair has been held for more than two hundred "
    "years, and it is still the bigest event of the year.",
    "The old stone bridge in the center of town was built in 1820. It has survived three floods and one "
    "earthquake, although the eastern arch had to be rebuilt after the flood of 1911. Today the bridge "
    "is closed to cars, and people walk across it to reach the market on the other side of the river.",
    "Most visitors come in the summer, when the weather is warm and the hills are green. They stay in "
    "small guest houses, eat at the family restaurants on Main Street, and take long walks along the "
    "river path. In the evening many of them sit by the water and watch the sun go down behind the hills.",
    "The school on Hill Road has four classrooms, a small library and a garden where the children grow "
    "beans and tomatos. The teachers organise a concert every December, and parents bring soup and bread "
    "for everyone after the show.",
    "A new train line will connect Millbrook to the city by 2027. The council hopes that the line will "
    "bring more visitors, but some residents worry that the quiet character of the town could change.",
]


def copy_prompt(paragraphs: list[str]) -> list[dict]:
    text = "\n\n".join(paragraphs)
    return [{"role": "user", "content": f"Rewrite the following text, fixing typos:\n\n{text}"}]


def concurrent_prompts(n: int) -> list[list[dict]]:
    """Distinct copy-heavy prompts: rotations and pairs of the paragraphs, numbered."""
    out = []
    for i in range(n):
        a = PARAGRAPHS[i % len(PARAGRAPHS)]
        b = PARAGRAPHS[(i * 3 + 1) % len(PARAGRAPHS)]
        out.append(copy_prompt([f"Note {i + 1}.", a] + ([b] if i % 2 else [])))
    return out


# --- drivers ------------------------------------------------------------------------------------
def run_one(llm: LLM, prompt: list[int], sp: SamplingParams) -> dict:
    """One request alone: prefill, then decode timed from the first token to the last."""
    eng = llm.engine
    eng.kv.pool.reset_prefix_cache()
    req = eng.add_request(f"b1-{time.monotonic_ns()}", prompt, sp)
    t_start = time.perf_counter()
    while not req.output_token_ids:
        eng.step()
    t_first = time.perf_counter()
    steps = 0
    while not req.is_finished:
        eng.step()
        steps += 1
    t_end = time.perf_counter()
    n = len(req.output_token_ids)
    decode_s = t_end - t_first
    return {
        "tokens": list(req.output_token_ids),
        "num_tokens": n,
        "prefill_s": t_first - t_start,
        "decode_s": decode_s,
        "decode_steps": steps,
        "decode_tok_s": (n - 1) / decode_s if decode_s > 0 else 0.0,
    }


def run_many(llm: LLM, prompts: list[list[int]], sp: SamplingParams, trace: bool = False) -> dict:
    """All prompts admitted at once, stepped to the end. ``trace``: also where each step's time went."""
    eng = llm.engine
    eng.kv.pool.reset_prefix_cache()
    reqs = [eng.add_request(f"c{i}-{time.monotonic_ns()}", p, sp) for i, p in enumerate(prompts)]
    tracer = StepTracer(eng) if trace else None
    t0 = time.perf_counter()
    steps = 0
    while eng.has_unfinished():
        if tracer is not None:
            tracer.step()
        else:
            eng.step()
        steps += 1
    wall = time.perf_counter() - t0
    tokens = sum(len(r.output_token_ids) for r in reqs)
    out = {"wall_s": wall, "output_tokens": tokens, "output_tok_s": tokens / wall, "steps": steps}
    if tracer is not None:
        tracer.close()
        out["step_trace"] = tracer.summary()
    return out


class StepTracer:
    """Diagnostics: wall time of each engine step, split into its phases (propose, schedule,
    execute, update), grouped by step kind: ``prefill`` (some prompt chunk ran), ``decode`` (every
    row a plain decode) or ``verify`` (some request verified drafts). On a GPU the device work shows
    up where the host first waits for it (sampling in ``execute``, verification in ``update``)."""

    PHASES = {"propose": ("spec", "propose"), "schedule": ("scheduler", "schedule"),
              "execute": ("runner", "execute"), "update": (None, "_update")}  # fmt: skip

    def __init__(self, eng) -> None:
        self.eng = eng
        self.kinds: dict[str, dict] = {}
        self._phase: dict[str, float] = {}
        self._kind = "decode"
        self._patched: list[tuple[object, str]] = []
        self._gc_start = 0.0
        gc.callbacks.append(self._on_gc)  # Python's cyclic collector shows up as its own phase
        for phase, (attr, method) in self.PHASES.items():
            owner = eng if attr is None else getattr(eng, attr)
            if owner is not None:
                self._wrap(owner, method, phase)

    def _wrap(self, owner, method: str, phase: str) -> None:
        inner = getattr(owner, method)

        def timed(*args, **kwargs):
            if phase == "execute":
                batch = args[0]
                spec = any(s.num_spec_tokens for s in batch.requests)
                prefill = any(s.num_new_tokens - s.num_spec_tokens > 1 for s in batch.requests)
                self._kind = "prefill" if prefill else ("verify" if spec else "decode")
            t = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self._phase[phase] = self._phase.get(phase, 0.0) + time.perf_counter() - t

        setattr(owner, method, timed)
        self._patched.append((owner, method))

    def _on_gc(self, stage: str, info: dict) -> None:
        if stage == "start":
            self._gc_start = time.perf_counter()
        else:
            self._phase["gc"] = self._phase.get("gc", 0.0) + time.perf_counter() - self._gc_start

    def step(self) -> None:
        self._phase, self._kind = {}, "decode"
        t = time.perf_counter()
        outs = self.eng.step()
        total = time.perf_counter() - t
        k = self.kinds.setdefault(self._kind, {"steps": 0, "seconds": 0.0, "tokens": 0, "phases": {}})
        k["steps"] += 1
        k["seconds"] += total
        k["tokens"] += sum(len(o.new_token_ids) for o in outs)
        for phase, sec in self._phase.items():
            k["phases"][phase] = k["phases"].get(phase, 0.0) + sec

    def close(self) -> None:
        gc.callbacks.remove(self._on_gc)
        for owner, method in self._patched:
            delattr(owner, method)  # the instance attribute shadowed the class's method

    def summary(self) -> dict:
        out = {}
        for kind, k in self.kinds.items():
            n = k["steps"]
            out[kind] = {
                "steps": n,
                "ms_per_step": 1000 * k["seconds"] / n,
                "tokens_per_step": k["tokens"] / n,
                "phase_ms_per_step": {p: 1000 * s / n for p, s in k["phases"].items()},
            }
        return out


def spec_summary(llm: LLM) -> dict | None:
    spec = llm.engine.spec
    if spec is None:
        return None
    out = spec.metrics.snapshot()
    out["step_cost_fit_s"] = [float(x) for x in spec.policy.step_cost.w]  # c0, per token, per verifying seq
    return out


def set_spec(llm: LLM, config: SpecConfig | None, draft_engine=None) -> None:
    llm.engine.set_spec(build_spec_decoder(llm.engine, config, draft_engine=draft_engine) if config else None)


class Decoders:
    """One spec decoder per configuration, kept across the warm-up and every run, as a server keeps
    its own across requests: the adaptive policy starts each measured run with what it has learned.
    The counters are reset before each run, so each run reports its own."""

    def __init__(self, llm: LLM) -> None:
        self.llm, self._built = llm, {}

    def use(self, name: str, config: SpecConfig | None) -> None:
        if config is None:
            self.llm.engine.set_spec(None)
            return
        if name not in self._built:
            self._built[name] = build_spec_decoder(self.llm.engine, config)
        decoder = self._built[name]
        decoder.metrics = SpecDecodeMetrics()
        self.llm.engine.set_spec(decoder)


def ngram_config(args, adaptive: bool) -> SpecConfig:
    extra = {} if args.ngram_min is None else {"ngram_min": args.ngram_min}
    return SpecConfig(method="ngram", num_speculative_tokens=args.k, adaptive=adaptive, **extra)


def ngram_configs(args) -> dict[str, SpecConfig | None]:
    return {
        "none": None,
        "ngram_adaptive": ngram_config(args, adaptive=True),
        "ngram_fixed_k": ngram_config(args, adaptive=False),
    }


def warm_up_sampling(args, sp: SamplingParams, cpu_max_tokens: int) -> SamplingParams:
    """A full-length warm-up on a GPU (every kernel shape of the measured runs compiles in it),
    a short one on a CPU (nothing compiles there)."""
    return sp if args.device.startswith("cuda") else replace(sp, max_tokens=cpu_max_tokens)


def profiled(fn):
    """Run ``fn`` under cProfile, print its top functions by own time; returns (result, that text)."""
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    out = fn()
    prof.disable()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(25)
    print(text.getvalue())
    return out, text.getvalue()


def host_profile(llm: LLM, args) -> dict:
    """Where the host time of a fixed-k batch-1 run goes: cProfile's top functions by own time."""
    prompt = llm.render_chat(copy_prompt(PARAGRAPHS[:3]))
    sp = SamplingParams(max_tokens=args.max_tokens, temperature=0.0)
    set_spec(llm, ngram_config(args, adaptive=False))
    run_one(llm, prompt, replace(sp, max_tokens=24))
    r, top = profiled(lambda: run_one(llm, prompt, sp))
    return {"decode_steps": r["decode_steps"], "decode_s": r["decode_s"], "top_by_own_time": top}


# --- sections -----------------------------------------------------------------------------------
def bench_batch1(llm: LLM, args) -> dict:
    prompt = llm.render_chat(copy_prompt(PARAGRAPHS[:3]))
    sp = SamplingParams(max_tokens=args.max_tokens, temperature=0.0)
    configs = ngram_configs(args)
    decoders = Decoders(llm)
    warm = warm_up_sampling(args, sp, cpu_max_tokens=24)
    for name, cfg in configs.items():  # warm-up (first-call costs of each path), not measured
        decoders.use(name, cfg)
        run_one(llm, prompt, warm)
    runs: dict[str, list[dict]] = {name: [] for name in configs}
    for _ in range(args.reps):
        for name, cfg in configs.items():
            decoders.use(name, cfg)
            r = run_one(llm, prompt, sp)
            r["spec"] = spec_summary(llm)
            runs[name].append(r)
    base_tokens = runs["none"][0]["tokens"]
    out = {"prompt_tokens": len(prompt), "configs": {}}
    for name, rs in runs.items():
        tok_s = statistics.median(r["decode_tok_s"] for r in rs)
        out["configs"][name] = {
            "decode_tok_s_median": tok_s,
            "decode_tok_s_runs": [r["decode_tok_s"] for r in rs],
            "num_tokens": rs[0]["num_tokens"],
            "decode_steps": rs[0]["decode_steps"],
            "identical_to_baseline": all(r["tokens"] == base_tokens for r in rs),
            "spec": rs[-1]["spec"],
            "step_trace": rs[-1].get("step_trace"),
        }
    base = out["configs"]["none"]["decode_tok_s_median"]
    for c in out["configs"].values():
        c["speedup"] = c["decode_tok_s_median"] / base
    return out


def bench_concurrent(llm: LLM, args) -> dict:
    prompts = [llm.render_chat(c) for c in concurrent_prompts(args.concurrency)]
    sp = SamplingParams(max_tokens=args.concurrent_max_tokens, temperature=0.0)
    configs = ngram_configs(args)
    decoders = Decoders(llm)
    warm = warm_up_sampling(args, sp, cpu_max_tokens=8)
    for name, cfg in configs.items():  # warm-up, not measured
        decoders.use(name, cfg)
        run_many(llm, prompts, warm)
    runs: dict[str, list[dict]] = {name: [] for name in configs}
    for rep in range(args.concurrent_reps):
        for name, cfg in configs.items():
            if name == "ngram_fixed_k" and rep > 0:
                continue  # shown once: the failure mode the policy avoids
            decoders.use(name, cfg)
            if args.profile and name == "ngram_adaptive" and rep == 0:
                r, _ = profiled(lambda: run_many(llm, prompts, sp))
            else:
                # The last run of each configuration also says where its steps' time went.
                r = run_many(llm, prompts, sp, trace=rep == args.concurrent_reps - 1 or name == "ngram_fixed_k")
            r["spec"] = spec_summary(llm)
            runs[name].append(r)
    out = {
        "concurrency": len(prompts),
        "mean_prompt_tokens": statistics.mean(len(p) for p in prompts),
        "configs": {},
    }
    for name, rs in runs.items():
        out["configs"][name] = {
            "output_tok_s_median": statistics.median(r["output_tok_s"] for r in rs),
            "output_tok_s_runs": [r["output_tok_s"] for r in rs],
            "output_tokens": rs[0]["output_tokens"],
            "steps": [r["steps"] for r in rs],
            "spec": rs[-1]["spec"],
            "step_trace": rs[-1].get("step_trace"),
        }
    base = out["configs"]["none"]["output_tok_s_median"]
    for c in out["configs"].values():
        c["ratio_to_none"] = c["output_tok_s_median"] / base
    return out


def bench_draft(llm: LLM, args) -> dict:
    t0 = time.perf_counter()
    draft = load_draft_engine(llm.engine, SpecConfig(method="draft", draft_model=None, draft_num_blocks=512))
    load_s = time.perf_counter() - t0
    prompt = llm.render_chat(copy_prompt(PARAGRAPHS[:3]))
    sp = SamplingParams(max_tokens=args.draft_max_tokens, temperature=0.0)
    set_spec(llm, None)
    base = run_one(llm, prompt, sp)
    forwards: list[tuple[int, float]] = []
    cfg = SpecConfig(method="draft", num_speculative_tokens=4, adaptive=False, draft_catch_up_tokens=1 << 20)
    set_spec(llm, cfg, draft)
    proposer = llm.engine.spec.proposer
    hook = proposer.on_forward
    proposer.on_forward = lambda rows, s: (forwards.append((rows, s)), hook(rows, s))
    spec = run_one(llm, prompt, sp)
    summary = spec_summary(llm)
    draft_decode = [s for rows, s in forwards if rows == 1]
    verify_steps = spec["decode_steps"]
    draft_time = sum(s for _, s in forwards)
    out = {
        "draft_load_s": load_s,
        "baseline_decode_tok_s": base["decode_tok_s"],
        "spec_decode_tok_s": spec["decode_tok_s"],
        "identical_to_baseline": spec["tokens"] == base["tokens"],
        "acceptance_rate": summary["acceptance_rate"],
        "mean_accepted_length": summary["mean_accepted_length"],
        "num_accepted_tokens_per_pos": summary["num_accepted_tokens_per_pos"],
        "baseline_decode_step_ms": 1000 * base["decode_s"] / max(1, base["decode_steps"]),
        "draft_forward_1_token_ms_median": 1000 * statistics.median(draft_decode) if draft_decode else None,
        "verify_step_ms_mean": 1000 * (spec["decode_s"] - draft_time) / max(1, verify_steps),
        "spec_step_ms_mean": 1000 * spec["decode_s"] / max(1, verify_steps),
    }
    # Policy on: a draft as costly as the target never pays, so the policy should decline to draft.
    set_spec(llm, replace(cfg, adaptive=True), draft)
    adaptive = run_one(llm, prompt, sp)
    out["adaptive_decode_tok_s"] = adaptive["decode_tok_s"]
    out["adaptive_num_drafts"] = llm.engine.spec.metrics.num_drafts
    # The draft's catch-up prefill on a decode worker, and the target's own prefill of the same prompt.
    out["catch_up"] = draft_catch_up(llm, draft, prompt)
    set_spec(llm, None)
    return out


@torch.inference_mode()
def draft_catch_up(llm: LLM, draft, prompt: list[int]) -> dict:
    from engine.spec_decode.draft import DraftModelProposer

    proposer = DraftModelProposer(draft, catch_up_tokens=256)
    sampler = llm.engine.runner.sampler
    req = Request("catch-up", list(prompt), SamplingParams(temperature=0.0), status=RequestStatus.RUNNING)
    req.output_token_ids = [prompt[-1]]  # as if the prefill worker's KV and first token had landed
    req.num_computed_tokens = req.num_tokens - 1
    steps, t0 = 0, time.perf_counter()
    while True:
        steps += 1
        drafts = proposer.propose([(req, 1, "greedy")], sampler)
        if drafts:
            break
    catch_up_s = time.perf_counter() - t0
    proposer.forget(req.request_id)
    eng = llm.engine
    eng.kv.pool.reset_prefix_cache()
    r = eng.add_request(
        f"prefill-{time.monotonic_ns()}", list(prompt), SamplingParams(max_tokens=1, temperature=0.0)
    )
    t0 = time.perf_counter()
    while not r.is_finished:
        eng.step()
    target_prefill_s = time.perf_counter() - t0
    return {
        "prompt_tokens": len(prompt) + 1,
        "draft_catch_up_ms": 1000 * catch_up_s,
        "draft_catch_up_steps": steps,
        "target_prefill_ms": 1000 * target_prefill_s,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", default=None, help="model spec (default: the default model)")
    ap.add_argument("--dtype", default="auto", help="auto: float32 on CPU, bfloat16 on GPU")
    ap.add_argument("--k", type=int, default=8, help="most draft tokens per request per step")
    ap.add_argument("--max-tokens", type=int, default=320, help="batch-1 output limit (greedy stops at EOS)")
    ap.add_argument("--reps", type=int, default=2, help="batch-1 runs per configuration (alternating)")
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--concurrent-max-tokens", type=int, default=96)
    ap.add_argument("--concurrent-reps", type=int, default=2)
    ap.add_argument("--draft-max-tokens", type=int, default=96)
    ap.add_argument(
        "--ngram-min", type=int, default=None, help="shortest n-gram matched (default: SpecConfig's)"
    )
    ap.add_argument(
        "--profile", action="store_true", help="host-side profile of one fixed-k batch-1 run (diagnostics)"
    )
    ap.add_argument("--skip", nargs="*", default=[], choices=["batch1", "concurrent", "draft"])
    ap.add_argument("--out", default=None, help="write the JSON results here")
    args = ap.parse_args(argv)

    load_before = os.getloadavg()
    t_start = time.perf_counter()
    llm = LLM(
        args.model,
        device=args.device,
        dtype=args.dtype,
        max_num_batched_tokens=512,
        max_num_seqs=max(64, args.concurrency),
    )
    if llm.tokenizer is None and os.environ.get("BATON_TOKENIZER"):  # dummy weights: borrow a tokenizer
        from baton.text import Tokenizer

        llm.tokenizer = Tokenizer.from_dir(os.environ["BATON_TOKENIZER"])
    results: dict = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "device": args.device,
        "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
        "dtype": str(llm.engine.runner.kv_cache.dtype),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "model": llm.source.name,
        "load_average_before": load_before,
    }
    if "batch1" not in args.skip:
        results["batch1_ngram"] = bench_batch1(llm, args)
        print_batch1(results["batch1_ngram"])
    if args.profile:
        results["host_profile"] = host_profile(llm, args)
    if "concurrent" not in args.skip:
        results["concurrent"] = bench_concurrent(llm, args)
        print_concurrent(results["concurrent"])
    if "draft" not in args.skip:
        results["draft_model_self"] = bench_draft(llm, args)
        print_draft(results["draft_model_self"])
    results["load_average_after"] = os.getloadavg()
    results["total_s"] = time.perf_counter() - t_start
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2))
        print(f"wrote {args.out}")
    return 0


def print_batch1(r: dict) -> None:
    print(f"\n== batch 1, n-gram, copy-heavy prompt ({r['prompt_tokens']} tokens), greedy ==")
    print(
        f"{'config':<16}{'decode tok/s':>14}{'speedup':>9}{'tokens':>8}{'steps':>7}{'accept':>8}{'tok/verify':>11}  identical"
    )
    for name, c in r["configs"].items():
        s = c["spec"] or {}
        acc = f"{s['acceptance_rate']:.2f}" if s else "-"
        mal = f"{s['mean_accepted_length']:.2f}" if s else "-"
        print(
            f"{name:<16}{c['decode_tok_s_median']:>14.1f}{c['speedup']:>8.2f}x{c['num_tokens']:>8}{c['decode_steps']:>7}{acc:>8}{mal:>11}  {c['identical_to_baseline']}"
        )


def print_concurrent(r: dict) -> None:
    print(
        f"\n== {r['concurrency']} concurrent requests (mean prompt {r['mean_prompt_tokens']:.0f} tokens), greedy =="
    )
    print(f"{'config':<16}{'output tok/s':>14}{'vs none':>9}{'drafts':>8}{'accept':>8}  runs")
    for name, c in r["configs"].items():
        s = c["spec"] or {}
        runs = ", ".join(f"{x:.1f}" for x in c["output_tok_s_runs"])
        acc = f"{s['acceptance_rate']:.2f}" if s else "-"
        print(
            f"{name:<16}{c['output_tok_s_median']:>14.1f}{c['ratio_to_none']:>8.2f}x{s.get('num_drafts', 0):>8}{acc:>8}  {runs}"
        )
    print("step time by kind (last run of each config): steps x ms/step, tokens/step; phases in ms/step")
    for name, c in r["configs"].items():
        for kind, k in (c.get("step_trace") or {}).items():
            phases = " ".join(f"{p}={v:.2f}" for p, v in k["phase_ms_per_step"].items())
            print(
                f"  {name:<16}{kind:<8}{k['steps']:>5} x {k['ms_per_step']:6.2f} ms  {k['tokens_per_step']:6.1f} tok  {phases}"
            )


def print_draft(r: dict) -> None:
    print("\n== draft model = the default model itself, k = 4, batch 1 ==")
    for key in (
        "acceptance_rate", "mean_accepted_length", "identical_to_baseline", "baseline_decode_tok_s", "spec_decode_tok_s",
        "adaptive_decode_tok_s", "adaptive_num_drafts", "baseline_decode_step_ms", "draft_forward_1_token_ms_median",
        "verify_step_ms_mean", "spec_step_ms_mean", "draft_load_s",
    ):  # fmt: skip
        v = r[key]
        print(f"  {key:<34}{v:.2f}" if isinstance(v, float) else f"  {key:<34}{v}")
    c = r["catch_up"]
    print(
        f"  draft catch-up prefill of {c['prompt_tokens']} tokens on the decode worker: {c['draft_catch_up_ms']:.0f} ms "
        f"in {c['draft_catch_up_steps']} step(s); target prefill of the same prompt: {c['target_prefill_ms']:.0f} ms"
    )


if __name__ == "__main__":
    sys.exit(main())
