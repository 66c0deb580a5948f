"""Per-run summary metrics, with the field names of vLLM's ``bench serve`` result JSON.

Definitions (over successful requests unless stated):
- ``duration``: seconds from the first send to the last completion (failures included).
- ``request_throughput`` = completed / duration; ``output_throughput`` = output tokens / duration;
  ``total_token_throughput`` = (input + output tokens) / duration.
- TPOT of a request = (e2e - ttft) / (output_tokens - 1), defined only for output_tokens > 1
  (the TPOT distribution leaves the others out).
- ITL: every inter-chunk gap of every successful request, pooled.
- goodput: completed requests meeting every SLO given (``ttft``, ``tpot``, ``e2el``, in ms) per
  second of duration. A one-token request has no TPOT and meets any TPOT SLO.
- Summary statistics are in milliseconds: mean, median, population std and percentiles with linear
  interpolation (numpy's default). A metric with no samples reports ``None`` (JSON null).
- ``by_kind`` (only when the workload mixes kinds, e.g. long-mixed's "short"/"long"): the same
  latency summaries per request kind, so short-chat ITL can be read apart from long prompts.
- Raw per-request arrays (``ttfts``, ``e2els`` in seconds, ``itls`` lists in seconds, ``input_lens``,
  ``output_lens``, ``errors``, ``kinds``) are in request order and include failed requests
  (null latency, 0 output tokens, a non-empty error).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence

import numpy as np

from baton.bench.client import RequestResult

METRIC_NAMES = ("ttft", "tpot", "itl", "e2el")
GOODPUT_METRICS = ("ttft", "tpot", "e2el")


def parse_percentile_metrics(text: str) -> tuple[str, ...]:
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = [n for n in names if n not in METRIC_NAMES]
    if unknown or not names:
        raise ValueError(
            f"percentile metrics must be a comma list of {', '.join(METRIC_NAMES)}, got {text!r}"
        )
    return names


def parse_metric_percentiles(text: str) -> tuple[float, ...]:
    values = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            value = float(part)
        except ValueError as exc:
            raise ValueError(f"percentile {part!r} is not a number") from exc
        if not 0.0 < value <= 100.0:
            raise ValueError(f"percentiles must be in (0, 100], got {part}")
        values.append(value)
    if not values:
        raise ValueError("no metric percentile given")
    return tuple(values)


def parse_goodput(items: Iterable[str]) -> dict[str, float]:
    """``["ttft:2000", "tpot:50"]`` -> {"ttft": 2000.0, "tpot": 50.0} (milliseconds)."""
    slos: dict[str, float] = {}
    for item in items:
        name, sep, value = item.partition(":")
        name = name.strip()
        if not sep or name not in GOODPUT_METRICS:
            raise ValueError(
                f"goodput SLO must look like NAME:MS with NAME in {', '.join(GOODPUT_METRICS)}, got {item!r}"
            )
        try:
            ms = float(value)
        except ValueError as exc:
            raise ValueError(f"goodput SLO {item!r} has a non-numeric value") from exc
        if ms < 0:
            raise ValueError(f"goodput SLO {item!r} must be >= 0 ms")
        slos[name] = ms
    return slos


def percentile_key(p: float) -> str:
    """99 -> "p99", 99.9 -> "p99.9"."""
    return f"p{int(p)}" if float(p).is_integer() else f"p{p:g}"


def tpot_seconds(result: RequestResult) -> float | None:
    if not result.success or result.output_len <= 1 or result.e2el is None or result.ttft is None:
        return None
    return (result.e2el - result.ttft) / (result.output_len - 1)


def meets_slos(result: RequestResult, slos: dict[str, float]) -> bool:
    if not result.success or result.ttft is None or result.e2el is None:
        return False
    values_ms = {
        "ttft": result.ttft * 1000.0,
        "tpot": (tpot_seconds(result) or 0.0) * 1000.0,
        "e2el": result.e2el * 1000.0,
    }
    return all(values_ms[name] <= limit for name, limit in slos.items())


def summarize_ms(
    name: str, values_s: Sequence[float], percentiles: Sequence[float], with_percentiles: bool
) -> dict[str, float | None]:
    """mean/median/std (and percentiles) of ``values_s`` in ms under vLLM's key names."""
    arr = np.asarray(values_s, dtype=float) * 1000.0
    empty = arr.size == 0
    out: dict[str, float | None] = {
        f"mean_{name}_ms": None if empty else float(np.mean(arr)),
        f"median_{name}_ms": None if empty else float(np.median(arr)),
        f"std_{name}_ms": None if empty else float(np.std(arr)),
    }
    if with_percentiles:
        for p in percentiles:
            out[f"{percentile_key(p)}_{name}_ms"] = None if empty else float(np.percentile(arr, p))
    return out


def latency_summary(
    ok: Sequence[RequestResult], percentile_metrics: Sequence[str], percentiles: Sequence[float]
) -> dict[str, float | None]:
    """Summaries of TTFT, TPOT, ITL and e2e latency over successful requests ``ok``."""
    samples: dict[str, list[float]] = {
        "ttft": [r.ttft for r in ok if r.ttft is not None],
        "tpot": [t for t in (tpot_seconds(r) for r in ok) if t is not None],
        "itl": [gap for r in ok for gap in r.itl],
        "e2el": [r.e2el for r in ok if r.e2el is not None],
    }
    out: dict[str, float | None] = {}
    for name in METRIC_NAMES:
        out.update(summarize_ms(name, samples[name], percentiles, name in percentile_metrics))
    return out


def compute_metrics(
    results: Sequence[RequestResult],
    duration_s: float,
    percentile_metrics: Sequence[str] = METRIC_NAMES,
    percentiles: Sequence[float] = (99.0,),
    goodput_slos: dict[str, float] | None = None,
) -> dict:
    if duration_s <= 0:
        raise ValueError(f"duration must be > 0, got {duration_s}")
    ok = [r for r in results if r.success]
    total_input = sum(r.prompt_len for r in ok)
    total_output = sum(r.output_len for r in ok)
    metrics: dict = {
        "duration": duration_s,
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "total_input_tokens": total_input,
        "total_output_tokens": total_output,
        "request_throughput": len(ok) / duration_s,
        "request_goodput": None,
        "output_throughput": total_output / duration_s,
        "total_token_throughput": (total_input + total_output) / duration_s,
    }
    if goodput_slos:
        metrics["request_goodput"] = sum(meets_slos(r, goodput_slos) for r in ok) / duration_s
    metrics.update(latency_summary(ok, percentile_metrics, percentiles))
    kinds = sorted({r.kind for r in results})
    if len(kinds) > 1:
        metrics["by_kind"] = {
            kind: {
                "completed": sum(1 for r in ok if r.kind == kind),
                "failed": sum(1 for r in results if r.kind == kind and not r.success),
                **latency_summary([r for r in ok if r.kind == kind], percentile_metrics, percentiles),
            }
            for kind in kinds
        }
    start = min((r.send_time for r in results), default=0.0)
    metrics.update(
        {
            "input_lens": [r.prompt_len for r in results],
            "output_lens": [r.output_len for r in results],
            "ttfts": [r.ttft for r in results],
            "e2els": [r.e2el for r in results],
            "itls": [list(r.itl) for r in results],
            "send_times": [r.send_time - start for r in results],
            # Wall clock of send_times' zero, to line a run up with server-side logs and traces.
            "start_time_unix": time.time() - (time.perf_counter() - start) if results else None,
            "kinds": [r.kind for r in results],
            "errors": [r.error for r in results],
        }
    )
    return metrics
