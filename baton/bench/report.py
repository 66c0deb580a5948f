"""Human-readable tables and result files.

The per-run table follows the layout of vLLM's ``bench serve`` summary so numbers can be read side
by side; the sweep table puts one run per row.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from pathlib import Path

from baton.bench.metrics import percentile_key

WIDTH = 50
SECTIONS = {
    "ttft": ("Time to First Token", "TTFT"),
    "tpot": ("Time per Output Token (excl. 1st token)", "TPOT"),
    "itl": ("Inter-token Latency", "ITL"),
    "e2el": ("End-to-end Latency", "E2EL"),
}


def rate_label(rate: float) -> str:
    return "inf" if math.isinf(rate) else f"{rate:g}"


def _fmt(value: object, digits: int | None = 2) -> str:
    """Floats with ``digits`` decimals (``None``: shortest form); None as "n/a"."""
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:g}" if digits is None else f"{value:.{digits}f}"
    return str(value)


def _line(label: str, value: object, digits: int | None = 2) -> str:
    return f"{label:<40}{_fmt(value, digits):<10}"


def format_result_table(result: dict, percentile_metrics: Sequence[str], percentiles: Sequence[float]) -> str:
    lines = [
        " Serving Benchmark Result ".center(WIDTH, "="),
        _line("Successful requests:", result["completed"]),
        _line("Failed requests:", result["failed"]),
        _line("Request rate configured (RPS):", result["request_rate"], None),
        _line("Maximum request concurrency:", result["max_concurrency"]),
        _line("Benchmark duration (s):", result["duration"]),
        _line("Total input tokens:", result["total_input_tokens"]),
        _line("Total generated tokens:", result["total_output_tokens"]),
        _line("Request throughput (req/s):", result["request_throughput"]),
    ]
    if result.get("request_goodput") is not None:
        lines.append(_line("Request goodput (req/s):", result["request_goodput"]))
    lines += [
        _line("Output token throughput (tok/s):", result["output_throughput"]),
        _line("Total token throughput (tok/s):", result["total_token_throughput"]),
    ]
    for name in percentile_metrics:
        title, short = SECTIONS[name]
        lines.append(f" {title} ".center(WIDTH, "-"))
        lines.append(_line(f"Mean {short} (ms):", result[f"mean_{name}_ms"]))
        lines.append(_line(f"Median {short} (ms):", result[f"median_{name}_ms"]))
        for p in percentiles:
            key = percentile_key(p)
            lines.append(_line(f"{key.upper()} {short} (ms):", result[f"{key}_{name}_ms"]))
    if result.get("by_kind"):
        lines += _by_kind_lines(result["by_kind"], percentile_metrics, percentiles)
    lines.append("=" * WIDTH)
    return "\n".join(lines)


def _by_kind_lines(
    by_kind: dict, percentile_metrics: Sequence[str], percentiles: Sequence[float]
) -> list[str]:
    """Per request kind: counts, mean TTFT and the highest requested percentile of TTFT and ITL."""
    lines = [" By request kind ".center(WIDTH, "-")]
    top = percentile_key(max(percentiles))
    for kind, summary in by_kind.items():
        lines.append(
            _line(f"{kind} requests (ok / failed):", f"{summary['completed']} / {summary['failed']}")
        )
        lines.append(_line(f"{kind} mean TTFT (ms):", summary["mean_ttft_ms"]))
        for name in ("ttft", "itl"):
            if name in percentile_metrics:
                lines.append(
                    _line(f"{kind} {top.upper()} {SECTIONS[name][1]} (ms):", summary[f"{top}_{name}_ms"])
                )
    return lines


SWEEP_COLUMNS = (
    ("rate", "request_rate", None),
    ("conc", "max_concurrency", 0),
    ("ok", "completed", 0),
    ("fail", "failed", 0),
    ("req/s", "request_throughput", 2),
    ("out tok/s", "output_throughput", 1),
    ("p99 TTFT ms", "p99_ttft_ms", 1),
    ("p99 TPOT ms", "p99_tpot_ms", 1),
    ("p99 ITL ms", "p99_itl_ms", 1),
    ("goodput", "request_goodput", 2),
)


def format_sweep_table(results: Sequence[dict]) -> str:
    header = [name for name, _, _ in SWEEP_COLUMNS]
    rows = [[_fmt(r.get(key), digits) for _, key, digits in SWEEP_COLUMNS] for r in results]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    out = ["  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True))]
    out += ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(out)


def slug(text: str) -> str:
    """A file-name-safe form of a model id or label."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "model"


def write_json(path: Path, data: dict | list) -> Path:
    """Strict JSON (no NaN/Infinity): rates are stored as numbers or the string "inf"."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return path
