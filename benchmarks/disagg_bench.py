"""Does disaggregation pay? Same ``long-mixed`` load (long prompts arriving among short chats) against:

  split       1 prefill + 1 decode worker (each on its own GPU), prefill steps of ``--split-chunk`` tokens
              (the prefill worker has no decodes to keep smooth: larger steps prefill faster); the
              client gets each first token the moment the prefill worker sampled it
  split-decode-first
              the same, with ``--first-token-from decode``: the first token reaches the client when the
              decode worker starts the stream (a few ms later), so every gap the client sees is a decode step
  agg         2 aggregated replicas (decode workers that prefill locally), chunked prefill on:
              steps of at most ``--chunk`` tokens, decodes included
  agg-nochunk 2 aggregated replicas with chunked prefill off (a whole prompt in one step)

Each configuration is a real ``baton serve``; the load is ``baton bench``. Reports p50/p99 ITL, TTFT
and goodput per configuration, and the ratios the issue asks for; plots every configuration's ITL tail
and TTFT CDF beside the JSON (``disagg.png``). ``--step-trace`` also writes every
worker's per-step timings (engine/step_trace.py) next to the results.

    python benchmarks/disagg_bench.py --model dummy:llama-3.2-1b --rate 4 --num-prompts 120 --out disagg.json
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from baton.bench.plots import plot_configurations

NO_CHUNK_TOKENS = 16384  # longer than any prompt of the load: a whole prompt in one step


def config_args(name: str, chunk: int, split_chunk: int) -> list[str]:
    split = ["--num-prefill", "1", "--num-decode", "1", "--prefill-chunk", str(split_chunk)]
    return {
        "split": split,
        "split-decode-first": [*split, "--first-token-from", "decode"],
        "agg": ["--num-prefill", "0", "--num-decode", "2", "--prefill-chunk", str(chunk)],
        "agg-nochunk": ["--num-prefill", "0", "--num-decode", "2", "--prefill-chunk", str(NO_CHUNK_TOKENS)],
    }[name]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(model: str, extra: list[str], log: Path, step_trace: Path | None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    out = open(log, "w")
    env = dict(os.environ)
    if step_trace is not None:
        env["BATON_STEP_TRACE"] = str(step_trace)
    proc = subprocess.Popen([sys.executable, "-m", "baton", "serve", "--model", model, "--port", str(port), "--grpc-port", "0",
                             "--max-model-len", str(NO_CHUNK_TOKENS), *extra], stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 600
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"baton serve exited: {log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return proc, url
        except Exception:
            time.sleep(1)
    raise TimeoutError("baton serve did not become healthy")


def bench(url: str, args, name: str, out_dir: Path) -> dict:
    cmd = [sys.executable, "-m", "baton.bench", "--base-url", url, "--endpoint", "completions", "--dataset", "long-mixed",
           "--num-prompts", str(args.num_prompts), "--request-rate", str(args.rate), "--ignore-eos", "--seed", "7",
           "--short-input-len", str(args.short_in), "--short-output-len", str(args.short_out),
           "--long-input-len", str(args.long_in), "--long-output-len", str(args.long_out), "--long-fraction", str(args.long_fraction),
           "--percentile-metrics", "ttft,itl,tpot,e2el", "--metric-percentiles", "50,90,99,99.9",
           "--goodput", f"ttft:{args.slo_ttft_ms}", f"tpot:{args.slo_tpot_ms}",
           "--result-dir", str(out_dir), "--result-filename", f"{name}.json", "--no-plots", "--disable-progress", "--timeout", "300"]
    subprocess.run(cmd, check=True)
    return json.loads((out_dir / f"{name}.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="dummy:llama-3.2-1b")
    ap.add_argument("--rate", type=float, default=4.0)
    ap.add_argument("--num-prompts", type=int, default=120)
    ap.add_argument("--short-in", type=int, default=256)
    ap.add_argument("--short-out", type=int, default=128)
    ap.add_argument("--long-in", type=int, default=8000)
    ap.add_argument("--long-out", type=int, default=32)
    ap.add_argument("--long-fraction", type=float, default=0.15)
    ap.add_argument("--slo-ttft-ms", type=float, default=2000)
    ap.add_argument("--slo-tpot-ms", type=float, default=50)
    ap.add_argument("--chunk", type=int, default=512, help="step size of 'agg' (chunked prefill among decodes)")
    ap.add_argument("--split-chunk", type=int, default=2048, help="prefill step size of 'split' (its prefill worker)")
    ap.add_argument("--configs", default="split,split-decode-first,agg,agg-nochunk")
    ap.add_argument("--step-trace", action="store_true", help="write each worker's per-step timings to steps-<config>/")
    ap.add_argument("--out", default="bench_results/disagg.json")
    args = ap.parse_args()
    out_dir = Path(args.out).parent
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {}
    for name in args.configs.split(","):
        trace_dir = out_dir / f"steps-{name}" if args.step_trace else None
        proc, url = serve(args.model, config_args(name, args.chunk, args.split_chunk), out_dir / f"serve-{name}.log", trace_dir)
        try:
            results[name] = bench(url, args, name, out_dir)
            # Every component's histograms (TTFT, ITL, queue, KV transfer) as the router shows them.
            with urllib.request.urlopen(f"{url}/metrics", timeout=30) as resp:
                (out_dir / f"metrics-{name}.txt").write_bytes(resp.read())
        finally:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(90)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
    keys = ("p99_itl_ms", "p99.9_itl_ms", "p90_itl_ms", "p50_itl_ms", "p99_ttft_ms", "request_goodput", "output_throughput", "completed", "failed")
    summary = {name: {k: r.get(k) for k in keys} for name, r in results.items()}
    for split in ("split", "split-decode-first"):
        if split in summary and "agg" in summary:
            summary[f"p99_itl_agg_over_{split}"] = summary["agg"]["p99_itl_ms"] / summary[split]["p99_itl_ms"]
    if "agg" in summary and "agg-nochunk" in summary:
        summary["p99_itl_nochunk_over_chunk"] = summary["agg-nochunk"]["p99_itl_ms"] / summary["agg"]["p99_itl_ms"]
    summary["load"] = vars(args)
    Path(args.out).write_text(json.dumps(summary, indent=2))
    plot_configurations(results, Path(args.out).with_suffix(".png"))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
