"""PNG plots of benchmark results (matplotlib, Agg canvas: no display, no pyplot global state).

- ``plot_latency_cdfs``: empirical CDFs of TTFT and ITL for one run.
- ``plot_sweep``: output throughput and p99 latencies against the swept rate (or concurrency).
- ``plot_configurations``: several configurations under the same load, side by side (ITL tails, TTFT CDFs).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from baton.bench.report import rate_label


def _cdf(ax, values_ms: Sequence[float], title: str) -> None:
    ax.set_title(title)
    ax.set_xlabel("milliseconds")
    ax.set_ylabel("fraction of samples")
    ax.grid(True, alpha=0.3)
    if len(values_ms) == 0:
        ax.text(0.5, 0.5, "no samples", ha="center", va="center", transform=ax.transAxes)
        return
    xs = np.sort(np.asarray(values_ms, dtype=float))
    ys = np.arange(1, xs.size + 1) / xs.size
    ax.step(xs, ys, where="post")
    for p, style in ((50, ":"), (99, "--")):
        ax.axvline(float(np.percentile(xs, p)), linestyle=style, color="grey", label=f"p{p}")
    ax.legend(loc="lower right")


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    return path


def plot_latency_cdfs(result: dict, path: Path) -> Path:
    """TTFT and ITL CDFs from a result's raw arrays (seconds), plotted in ms."""
    ttfts_ms = [t * 1000.0 for t in result["ttfts"] if t is not None]
    itls_ms = [gap * 1000.0 for request_itls in result["itls"] for gap in request_itls]
    fig = Figure(figsize=(11, 4))
    ax_ttft, ax_itl = fig.subplots(1, 2)
    _cdf(ax_ttft, ttfts_ms, f"TTFT CDF ({len(ttfts_ms)} requests)")
    _cdf(ax_itl, itls_ms, f"ITL CDF ({len(itls_ms)} gaps)")
    fig.suptitle(
        f"{result.get('model_id', '')} · {result.get('dataset_name', '')} · rate {result.get('request_rate')}"
    )
    return _save(fig, path)


def sweep_axis(results: Sequence[dict]) -> tuple[str, list[str]]:
    """Which knob varies across the sweep, and its tick labels."""
    concurrencies = [r.get("max_concurrency") for r in results]
    if len(set(concurrencies)) > 1:
        return "max concurrency", [str(c) for c in concurrencies]
    labels = [
        r["request_rate"] if isinstance(r["request_rate"], str) else rate_label(r["request_rate"])
        for r in results
    ]
    return "request rate (req/s)", labels


def plot_sweep(results: Sequence[dict], path: Path) -> Path:
    """Throughput and p99 TTFT/TPOT/ITL per sweep point (categorical x, so 'inf' has a place)."""
    axis_name, labels = sweep_axis(results)
    xs = np.arange(len(results))
    fig = Figure(figsize=(11, 4))
    ax_tput, ax_lat = fig.subplots(1, 2)
    ax_tput.plot(xs, [r["output_throughput"] for r in results], marker="o", label="output tok/s")
    ax_req = ax_tput.twinx()
    ax_req.plot(xs, [r["request_throughput"] for r in results], marker="s", color="tab:orange", label="req/s")
    ax_tput.set_ylabel("output tokens / s")
    ax_req.set_ylabel("requests / s")
    ax_tput.set_title("throughput")
    ax_tput.legend(loc="upper left")
    ax_req.legend(loc="lower right")
    for name in ("ttft", "tpot", "itl"):
        values = [r.get(f"p99_{name}_ms") for r in results]
        ax_lat.plot(xs, [np.nan if v is None else v for v in values], marker="o", label=f"p99 {name.upper()}")
    ax_lat.set_yscale("log")
    plain = FuncFormatter(lambda value, _pos: f"{value:g}")
    ax_lat.yaxis.set_major_formatter(plain)
    ax_lat.yaxis.set_minor_formatter(plain)
    ax_lat.set_ylabel("milliseconds")
    ax_lat.set_title("p99 latency")
    ax_lat.legend()
    for ax in (ax_tput, ax_lat):
        ax.set_xticks(xs, labels)
        ax.set_xlabel(axis_name)
        ax.grid(True, alpha=0.3)
    return _save(fig, path)


def plot_configurations(results: Mapping[str, dict], path: Path) -> Path:
    """Each configuration's ITL tail (the fraction of gaps longer than x, log scale: p99 is where a
    curve crosses 0.01) and TTFT CDF, one curve per configuration, from the results' raw arrays."""
    fig = Figure(figsize=(11, 4))
    ax_itl, ax_ttft = fig.subplots(1, 2)
    for name, result in results.items():
        itls = np.sort([gap * 1000.0 for request_itls in result["itls"] for gap in request_itls])
        if itls.size:
            above = 1.0 - np.arange(1, itls.size + 1) / itls.size
            ax_itl.step(itls[:-1], above[:-1], where="post", label=f"{name} (p99 {np.percentile(itls, 99):.1f} ms)")
        ttfts = np.sort([t * 1000.0 for t in result["ttfts"] if t is not None])
        if ttfts.size:
            ax_ttft.step(ttfts, np.arange(1, ttfts.size + 1) / ttfts.size, where="post", label=name)
    ax_itl.set_xscale("log")
    ax_itl.set_xlim(left=1.0)  # gaps under a millisecond are events of one step, not latency
    ax_itl.set_yscale("log")
    ax_itl.axhline(0.01, linestyle="--", color="grey")
    ax_itl.set_title("inter-token latency: fraction of gaps longer than x")
    ax_ttft.set_title("time to first token: CDF")
    for ax in (ax_itl, ax_ttft):
        ax.set_xlabel("milliseconds")
        ax.grid(True, alpha=0.3, which="both")
        ax.legend(fontsize=8)
    any_result = next(iter(results.values()), {})
    fig.suptitle(f"{any_result.get('dataset_name', '')} · rate {any_result.get('request_rate')}")
    return _save(fig, path)
