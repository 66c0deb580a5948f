"""Cross-check ``baton bench`` against an independent tool (GuideLLM) on the same server.

Both tools run the same closed-loop load against one base URL: ``--concurrency`` streams,
``--num-requests`` requests, synthetic prompts of ``--input-len`` tokens, exactly ``--output-len``
output tokens (``ignore_eos``). Then TTFT (mean, median) and output throughput are compared and the
ratio baton/peer printed; the exit status is 0 when every ratio is within ``--tolerance``.

GuideLLM lives in its own virtual environment (it pins its own dependency versions)::

    python -m venv /tmp/peerbench && /tmp/peerbench/bin/pip install guidellm
    python -m baton.bench.peer_check --base-url http://127.0.0.1:8000 \\
        --guidellm /tmp/peerbench/bin/guidellm --tokenizer /path/to/model_dir --concurrency 4

GuideLLM builds its prompts with a Hugging Face tokenizer, hence ``--tokenizer`` (a local directory
holding ``tokenizer.json``, e.g. the served model's directory, so no hub access is needed).
What the two tools time differs slightly: GuideLLM starts its TTFT clock when the request headers
start going out, ``baton bench`` just before the request is handed to the HTTP client, so ours
includes connection-pool wait and any TCP connect (a few ms on loopback).

The order is fixed: ``baton bench`` first (its probe request also warms the server), GuideLLM next.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import httpx

from baton.bench.client import fetch_model_id, normalize_base_url

GUIDELLM_REQUEST_FORMATS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}


@dataclass(frozen=True)
class PeerNumbers:
    """The numbers both tools report, in the same units."""

    tool: str
    ttft_mean_ms: float
    ttft_median_ms: float
    output_throughput: float  # output tokens per second over the run
    completed: int
    failed: int


@dataclass(frozen=True)
class Comparison:
    metric: str
    ours: float
    peer: float

    @property
    def ratio(self) -> float:
        return self.ours / self.peer if self.peer else float("inf")

    def within(self, tolerance: float) -> bool:
        return abs(self.ratio - 1.0) <= tolerance


def parse_baton_result(path: Path) -> PeerNumbers:
    data = json.loads(path.read_text(encoding="utf-8"))
    return PeerNumbers(
        tool="baton bench",
        ttft_mean_ms=float(data["mean_ttft_ms"]),
        ttft_median_ms=float(data["median_ttft_ms"]),
        output_throughput=float(data["output_throughput"]),
        completed=int(data["completed"]),
        failed=int(data["failed"]),
    )


def parse_guidellm_result(path: Path) -> PeerNumbers:
    """From GuideLLM's ``--output kind=json`` report: the first benchmark's
    ``metrics.time_to_first_token_ms.successful.{mean,median}`` (ms),
    ``metrics.output_tokens_per_second.successful.mean`` (tok/s over the run) and
    ``metrics.request_totals.{successful,errored}``."""
    data = json.loads(path.read_text(encoding="utf-8"))
    benchmarks = data.get("benchmarks") or []
    if not benchmarks:
        raise ValueError(f"{path} holds no benchmark")
    metrics = benchmarks[0]["metrics"]
    ttft = metrics["time_to_first_token_ms"]["successful"]
    totals = metrics["request_totals"]
    return PeerNumbers(
        tool="guidellm",
        ttft_mean_ms=float(ttft["mean"]),
        ttft_median_ms=float(ttft["median"]),
        output_throughput=float(metrics["output_tokens_per_second"]["successful"]["mean"]),
        completed=int(totals["successful"]),
        failed=int(totals["errored"]),
    )


def compare(ours: PeerNumbers, peer: PeerNumbers) -> list[Comparison]:
    return [
        Comparison("mean TTFT (ms)", ours.ttft_mean_ms, peer.ttft_mean_ms),
        Comparison("median TTFT (ms)", ours.ttft_median_ms, peer.ttft_median_ms),
        Comparison("output throughput (tok/s)", ours.output_throughput, peer.output_throughput),
    ]


def format_comparison(ours: PeerNumbers, peer: PeerNumbers, rows: list[Comparison], tolerance: float) -> str:
    lines = [
        f"{'metric':<28}{ours.tool:>14}{peer.tool:>14}{'ratio':>9}  within {tolerance:.0%}",
        *(
            f"{row.metric:<28}{row.ours:>14.2f}{row.peer:>14.2f}{row.ratio:>9.3f}  {'yes' if row.within(tolerance) else 'NO'}"
            for row in rows
        ),
        f"{'completed / failed':<28}{f'{ours.completed} / {ours.failed}':>14}{f'{peer.completed} / {peer.failed}':>14}",
    ]
    return "\n".join(lines)


def baton_command(args: argparse.Namespace, model: str, result_dir: Path) -> list[str]:
    return [
        sys.executable, "-m", "baton.bench",
        "--base-url", args.base_url, "--model", model, "--endpoint", args.endpoint,
        "--dataset-name", "random", "--random-input-len", str(args.input_len),
        "--random-output-len", str(args.output_len), "--ignore-eos",
        "--num-prompts", str(args.num_requests), "--max-concurrency", str(args.concurrency),
        "--request-rate", "inf", "--seed", str(args.seed), "--timeout", str(args.timeout),
        "--disable-progress", "--no-plots", "--result-dir", str(result_dir), "--result-filename", "baton",
    ]  # fmt: skip


def guidellm_command(args: argparse.Namespace, model: str, output: Path) -> list[str]:
    backend = ",".join(
        [
            "kind=openai_http",
            f"target={args.base_url}",
            f"model={model}",
            f"request_format={GUIDELLM_REQUEST_FORMATS[args.endpoint]}",
            f"timeout={args.timeout:g}",
            "validate_backend=false",  # it probes GET /health, which not every server has
        ]
        + ([f"api_key={args.api_key}"] if args.api_key else [])
    )
    return [
        args.guidellm, "run",
        "--backend", backend,
        "--profile", f"kind=concurrent,streams={args.concurrency}",
        "--constraint", f"kind=max_requests,count={args.num_requests}",
        "--tokenizer", f"kind=huggingface_auto,model={args.tokenizer}",
        "--data", f"kind=synthetic_text,prompt_tokens={args.input_len},output_tokens={args.output_len}",
        "--seed", f"kind=static,value={args.seed}",
        "--output", f"kind=json,path={output}",
        "--disable-console",
    ]  # fmt: skip


def _run(command: list[str], timeout_s: float, extra_env: dict[str, str]) -> None:
    env = {**os.environ, **extra_env}
    completed = subprocess.run(command, timeout=timeout_s, env=env, capture_output=True, text=True)
    if completed.returncode != 0:
        tail = (completed.stdout + completed.stderr)[-3000:]
        raise RuntimeError(f"{command[0]} exited with {completed.returncode}:\n{tail}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m baton.bench.peer_check", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--base-url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", default=None, help="default: first of GET /v1/models")
    parser.add_argument("--endpoint", choices=tuple(GUIDELLM_REQUEST_FORMATS), default="completions")
    parser.add_argument(
        "--api-key", default=os.environ.get("BATON_API_KEY") or os.environ.get("OPENAI_API_KEY")
    )
    parser.add_argument(
        "--guidellm", default="/tmp/peerbench/bin/guidellm", help="path to the guidellm executable"
    )
    parser.add_argument("--tokenizer", required=True, help="local directory with the model's tokenizer files")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--num-requests", type=int, default=40)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=300.0, help="per request, seconds")
    parser.add_argument("--run-timeout", type=float, default=1800.0, help="per tool run, seconds")
    parser.add_argument("--tolerance", type=float, default=0.10)
    parser.add_argument("--work-dir", default="bench_results/peer_check")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.base_url = normalize_base_url(args.base_url)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    model = args.model or _discover_model(args.base_url, args.api_key)
    try:
        # The key travels in the environment, not on a command line other users can read.
        _run(baton_command(args, model, work), args.run_timeout, {"BATON_API_KEY": args.api_key or ""})
        # Offline: the tokenizer is a local directory; a hub lookup would only add a network timeout.
        offline = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        _run(guidellm_command(args, model, work / "guidellm.json"), args.run_timeout, offline)
    except (RuntimeError, subprocess.TimeoutExpired, FileNotFoundError) as exc:
        print(f"peer check: {exc}", file=sys.stderr)
        return 2
    ours = parse_baton_result(work / "baton.json")
    peer = parse_guidellm_result(work / "guidellm.json")
    rows = compare(ours, peer)
    print(format_comparison(ours, peer, rows, args.tolerance))
    return 0 if all(row.within(args.tolerance) for row in rows) else 1


def _discover_model(base_url: str, api_key: str | None) -> str:
    async def go() -> str:
        async with httpx.AsyncClient(timeout=10.0, trust_env=False) as http:
            return await fetch_model_id(http, base_url, api_key)

    return asyncio.run(go())


if __name__ == "__main__":
    sys.exit(main())
