"""``baton bench`` command line: flags -> ``BenchSettings`` -> run -> tables, JSON and PNG files.

Flag names follow vLLM's ``bench serve`` where the concept is the same (``--request-rate``,
``--max-concurrency``, ``--num-prompts``, ``--percentile-metrics``, ``--metric-percentiles``,
``--goodput``, ``--result-dir``, ...), so existing command lines carry over.

Files written (unless ``--no-save``), with ``STEM`` = ``--result-filename`` or
``<endpoint>-<dataset>-<model>-<date>``: one run -> ``STEM.json`` + ``STEM-cdf.png``; a sweep ->
``STEM-rate<r>.json`` (or ``-conc<c>``) and its CDF plot per point, plus ``STEM-sweep.json``
(summaries without raw arrays) and ``STEM-sweep.png``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

from rich.console import Console

from baton.bench.arrivals import parse_concurrencies, parse_rates, sweep_points
from baton.bench.client import normalize_base_url
from baton.bench.datasets import DATASET_NAMES, DatasetSpec
from baton.bench.metrics import parse_goodput, parse_metric_percentiles, parse_percentile_metrics
from baton.bench.report import format_result_table, format_sweep_table, rate_label, slug, write_json
from baton.bench.runner import BenchError, BenchSettings, run_benchmark

RAW_ARRAY_FIELDS = ("input_lens", "output_lens", "ttfts", "e2els", "itls", "send_times", "kinds", "errors")
SWEEP_DROPPED_FIELDS = (*RAW_ARRAY_FIELDS, "by_kind")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``bench`` on the ``baton`` CLI; the handler is ``args.func`` (= ``run``)."""
    parser = subparsers.add_parser(
        "bench",
        help="benchmark an OpenAI-compatible server (TTFT, ITL, TPOT, throughput, goodput)",
        description="Load generator for any OpenAI-compatible endpoint; results use vLLM bench's field names.",
    )
    add_arguments(parser)
    parser.set_defaults(func=run)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    server = parser.add_argument_group("server")
    server.add_argument(
        "--base-url", default="http://127.0.0.1:8000", help="server root (a /v1 suffix is fine)"
    )
    server.add_argument("--model", default=None, help="model name (default: first of GET /v1/models)")
    server.add_argument("--endpoint", choices=("chat", "completions"), default="completions")
    server.add_argument(
        "--api-key",
        default=os.environ.get("BATON_API_KEY") or os.environ.get("OPENAI_API_KEY"),
        help="bearer token (default: $BATON_API_KEY or $OPENAI_API_KEY)",
    )

    data = parser.add_argument_group("workload")
    data.add_argument("--dataset-name", "--dataset", choices=DATASET_NAMES, default="random")
    data.add_argument("--dataset-path", default=None, help="ShareGPT JSON file (sharegpt only)")
    data.add_argument("--num-prompts", type=int, default=1000)
    data.add_argument("--random-input-len", type=int, default=1024)
    data.add_argument("--random-output-len", type=int, default=128)
    data.add_argument(
        "--random-range-ratio",
        type=float,
        default=0.0,
        help="lengths uniform in [L*(1-r), L*(1+r)]; applies to every synthetic dataset",
    )
    data.add_argument(
        "--sharegpt-output-len", type=int, default=None, help="override ShareGPT output lengths"
    )
    data.add_argument("--prefix-num-system-prompts", type=int, default=4)
    data.add_argument("--prefix-system-len", type=int, default=512)
    data.add_argument("--prefix-turns", type=int, default=4, help="turns per conversation")
    data.add_argument("--prefix-turn-input-len", type=int, default=64)
    data.add_argument("--prefix-turn-output-len", type=int, default=64)
    data.add_argument("--short-input-len", type=int, default=256, help="long-mixed: short chat prompt")
    data.add_argument("--short-output-len", type=int, default=128)
    data.add_argument("--long-input-len", type=int, default=4096, help="long-mixed: long prompt")
    data.add_argument("--long-output-len", type=int, default=128)
    data.add_argument("--long-fraction", type=float, default=0.1, help="long-mixed: fraction of long prompts")
    data.add_argument(
        "--no-tokenize-calibration",
        action="store_true",
        help="do not ask the server's /tokenize for the tokens-per-word ratio",
    )

    load = parser.add_argument_group("load")
    load.add_argument(
        "--request-rate", default="inf", help="req/s, Poisson; 'inf' = all at once; '1,2,4' sweeps"
    )
    load.add_argument("--max-concurrency", default=None, help="cap on requests in flight; '1,4,16' sweeps")
    load.add_argument(
        "--burstiness", type=float, default=1.0, help="gamma shape of arrival gaps; 1 = Poisson"
    )
    load.add_argument(
        "--ignore-eos", action="store_true", help="send ignore_eos: true for exact output lengths"
    )
    load.add_argument("--temperature", type=float, default=0.0)
    load.add_argument("--seed", type=int, default=0)
    load.add_argument("--timeout", type=float, default=300.0, help="per-request deadline in seconds")
    load.add_argument("--no-test-request", action="store_true", help="skip the initial probe request")

    out = parser.add_argument_group("results")
    out.add_argument("--percentile-metrics", default="ttft,tpot,itl,e2el")
    out.add_argument("--metric-percentiles", default="50,90,99")
    out.add_argument(
        "--goodput", nargs="+", default=[], metavar="NAME:MS", help="SLOs, e.g. ttft:2000 tpot:50"
    )
    out.add_argument("--result-dir", default="bench_results")
    out.add_argument("--result-filename", default=None, help="file stem (a .json suffix is dropped)")
    out.add_argument("--no-save", action="store_true", help="print only; write no files")
    out.add_argument("--no-plots", action="store_true")
    out.add_argument("--disable-progress", action="store_true")


def settings_from_args(args: argparse.Namespace) -> BenchSettings:
    """Validated settings; raises ValueError with a message naming the bad flag value."""
    if args.num_prompts < 1:
        raise ValueError(f"--num-prompts must be >= 1, got {args.num_prompts}")
    if not args.burstiness > 0:
        raise ValueError(f"--burstiness must be > 0, got {args.burstiness}")
    if not args.timeout > 0:
        raise ValueError(f"--timeout must be > 0, got {args.timeout}")
    if args.dataset_path and args.dataset_name != "sharegpt":
        raise ValueError("--dataset-path is only used by --dataset-name sharegpt")
    if args.dataset_path and not Path(args.dataset_path).is_file():
        raise ValueError(f"--dataset-path {args.dataset_path} is not a file")
    dataset = DatasetSpec(
        name=args.dataset_name,
        path=args.dataset_path,
        range_ratio=args.random_range_ratio,
        random_input_len=args.random_input_len,
        random_output_len=args.random_output_len,
        sharegpt_output_len=args.sharegpt_output_len,
        num_system_prompts=args.prefix_num_system_prompts,
        system_prompt_len=args.prefix_system_len,
        turns_per_conversation=args.prefix_turns,
        turn_input_len=args.prefix_turn_input_len,
        turn_output_len=args.prefix_turn_output_len,
        short_input_len=args.short_input_len,
        short_output_len=args.short_output_len,
        long_input_len=args.long_input_len,
        long_output_len=args.long_output_len,
        long_fraction=args.long_fraction,
    )
    return BenchSettings(
        base_url=normalize_base_url(args.base_url),
        dataset=dataset,
        points=tuple(sweep_points(parse_rates(args.request_rate), parse_concurrencies(args.max_concurrency))),
        model=args.model,
        endpoint=args.endpoint,
        api_key=args.api_key,
        num_prompts=args.num_prompts,
        burstiness=args.burstiness,
        ignore_eos=args.ignore_eos,
        temperature=args.temperature,
        seed=args.seed,
        timeout_s=args.timeout,
        percentile_metrics=parse_percentile_metrics(args.percentile_metrics),
        percentiles=parse_metric_percentiles(args.metric_percentiles),
        goodput_slos=parse_goodput(args.goodput),
        calibrate_tokens=not args.no_tokenize_calibration,
        probe=not args.no_test_request,
        show_progress=not args.disable_progress,
    )


def run(args: argparse.Namespace) -> int:
    """Exit status: 0 when every point completed at least one request, 1 otherwise or when the
    benchmark could not start, 2 for invalid flags."""
    try:
        settings = settings_from_args(args)
    except ValueError as exc:
        print(f"baton bench: error: {exc}", file=sys.stderr)
        return 2
    console = Console(stderr=True)
    try:
        results = asyncio.run(run_benchmark(settings, console))
    except (BenchError, RuntimeError) as exc:
        print(f"baton bench: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("baton bench: interrupted; no results written", file=sys.stderr)
        return 130
    for result in results:
        print(format_result_table(result, settings.percentile_metrics, settings.percentiles))
    if len(results) > 1:
        print(format_sweep_table(results))
    if not args.no_save:
        for path in save_results(
            results, Path(args.result_dir), args.result_filename, plots=not args.no_plots
        ):
            print(f"wrote {path}", file=sys.stderr)
    return 0 if all(r["completed"] > 0 for r in results) else 1


def point_suffix(result: dict, results: list[dict]) -> str:
    """ "" for a single run; "-rate<r>" or "-conc<c>" for the varying knob of a sweep."""
    if len(results) == 1:
        return ""
    if len({r["max_concurrency"] for r in results}) > 1:
        return f"-conc{result['max_concurrency']}"
    rate = result["request_rate"]
    return f"-rate{rate if isinstance(rate, str) else rate_label(rate)}"


def save_results(results: list[dict], result_dir: Path, stem: str | None, plots: bool) -> list[Path]:
    first = results[0]
    if stem is None:
        stem = f"{first['endpoint']}-{first['dataset_name']}-{slug(first['model_id'])}-{first['date']}"
    stem = stem.removesuffix(".json")
    written = []
    for result in results:
        point_stem = stem + point_suffix(result, results)
        written.append(write_json(result_dir / f"{point_stem}.json", result))
        if plots:
            # matplotlib is imported only when plots are written: it costs a second at start-up.
            from baton.bench.plots import plot_latency_cdfs

            written.append(plot_latency_cdfs(result, result_dir / f"{point_stem}-cdf.png"))
    if len(results) > 1:
        summaries = [{k: v for k, v in r.items() if k not in SWEEP_DROPPED_FIELDS} for r in results]
        written.append(write_json(result_dir / f"{stem}-sweep.json", summaries))
        if plots:
            from baton.bench.plots import plot_sweep

            written.append(plot_sweep(results, result_dir / f"{stem}-sweep.png"))
    return written
