"""GPU kernel microbenchmarks: ceilings, paged attention, fused ops — one command, a table and JSON.

    python benchmarks/gpu_kernels_bench.py [--out bench_results/gpu_kernels.json] [--quick] [--variants]
                                           [--sections decode,prefill,pointwise,gemv]

Measures, in one run on one card:
  * ceilings: device-to-device copy of 4 GiB (bytes read + written) and a bf16 8192^3 matmul;
  * decode attention (Llama-3.1-8B attention shape: 32 q heads, 8 KV heads, D 128, bf16, block 16)
    at context 512..32k and batch 1/16/64, as % of the copy bandwidth (bytes = K + V read);
  * prefill attention TFLOP/s (causal FLOPs) next to torch SDPA on the same, but dense, data;
  * every kernel next to its plain-torch reference;
  * few-row GEMV (Llama-3.1-8B / 3.2-1B linears at M = 1): F.linear (cuBLAS) next to the Triton
    gemv, in TB/s of weight read, single calls and back to back in a CUDA graph, and which one
    ``GemvDispatch`` picks.
Timing: CUDA events around each call, L2 flushed before each repetition, warmup, median.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.gemv_dispatch import GemvDispatch, GemvShape  # noqa: E402
from engine.kernels.activation import silu_and_mul, silu_and_mul_ref  # noqa: E402
from engine.kernels.decode_attention import choose_num_splits, decode_attention, decode_attention_ref  # noqa: E402
from engine.kernels.gemv import GemvConfig, gemv, gemv_config  # noqa: E402
from engine.kernels.kv_write import kv_write, kv_write_ref  # noqa: E402
from engine.kernels.norm import fused_add_rms_norm, fused_add_rms_norm_ref, rms_norm, rms_norm_ref  # noqa: E402
from engine.kernels.prefill_attention import prefill_attention, prefill_attention_ref  # noqa: E402
from engine.kernels.rotary import apply_rotary, apply_rotary_ref, rotary_cos_sin  # noqa: E402

HQ, HKV, D, BLOCK = 32, 8, 128, 16  # Llama-3.1-8B attention
DTYPE = torch.bfloat16
GIB = 1 << 30


class Timer:
    """Median CUDA-event time of ``fn`` in ms, L2 flushed before every repetition.

    The flush READS 256 MB: a write (``zero_()``) would leave ~50 MB of dirty L2 lines whose
    write-back lands inside the next timed call (seen: ~20 us extra on every decode call).
    The flush also keeps the GPU busy while the host launches ``fn``.
    """

    def __init__(self) -> None:
        self._flush = torch.randint(0, 255, (256 << 20,), dtype=torch.uint8, device="cuda")

    def __call__(self, fn: Callable[[], object], reps: int = 30, warmup: int = 3) -> float:
        for _ in range(warmup):
            fn()
        torch.cuda.synchronize()
        events = []
        for _ in range(reps):
            self._flush.sum(dtype=torch.int32)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            events.append((start, end))
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) for s, e in events)

    def graph(self, fns: list[Callable[[], object]], reps: int = 30) -> float:
        """Per-call time of ``fns`` captured back to back in one CUDA graph, as a model's decode
        step runs them (no host launch cost, no per-call graph-launch latency)."""
        for fn in fns:
            fn()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for fn in fns:
                fn()
        return self(graph.replay, reps=reps) / len(fns)


def _copy_gbs(timer: Timer) -> float:
    src = torch.randint(0, 256, (4 * GIB,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = timer(lambda: dst.copy_(src), reps=20)
    return 2 * src.numel() / ms / 1e6


def ceilings(timer: Timer) -> dict:
    copy_gbs = _copy_gbs(timer)  # its 8 GiB are freed on return
    n = 8192
    a = torch.randn(n, n, dtype=DTYPE, device="cuda")
    b = torch.randn(n, n, dtype=DTYPE, device="cuda")
    ms_mm = timer(lambda: a @ b, reps=20)
    return {"copy_GBps": copy_gbs, "matmul_bf16_TFLOPs": 2 * n**3 / ms_mm / 1e9}


def _random_tables(batch: int, blocks_per_seq: int, num_blocks: int, copies: int = 1) -> list[torch.Tensor]:
    """``copies`` block tables over disjoint random blocks (so back-to-back calls miss in L2,
    like successive layers)."""
    perm = torch.randperm(num_blocks, device="cuda")
    need = batch * blocks_per_seq
    copies = max(1, min(copies, num_blocks // need))
    return [perm[i * need : (i + 1) * need].view(batch, blocks_per_seq).int() for i in range(copies)]


def _decode_calls(kv, batch: int, ctx: int, num_blocks: int, **tiles) -> list[Callable[[], object]]:
    tables = _random_tables(batch, ctx // BLOCK, num_blocks, copies=16)
    lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
    q = torch.randn(batch, HQ, D, dtype=DTYPE, device="cuda")
    return [partial(decode_attention, q, kv, t, lens, D**-0.5, ctx, **tiles) for t in tables]


def decode_sweep(timer: Timer, copy_gbs: float, contexts, batches, ref_limit_bytes: int) -> list[dict]:
    num_blocks = max(contexts) * max(batches) // BLOCK + 64
    kv = torch.randn(2, num_blocks, BLOCK, HKV, D, dtype=DTYPE, device="cuda")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = []
    for batch in batches:
        for ctx in contexts:
            calls = _decode_calls(kv, batch, ctx, num_blocks)
            ms, graph_ms = timer(calls[0]), timer.graph(calls)
            kv_bytes = 2 * batch * ctx * HKV * D * kv.element_size()
            row = {
                "batch": batch,
                "context": ctx,
                "splits": choose_num_splits(batch, HKV, ctx, sms),
                "us": ms * 1e3,
                "GBps": kv_bytes / ms / 1e6,
                "pct_copy_bw": 100 * kv_bytes / ms / 1e6 / copy_gbs,
                "graph_calls": len(calls),
                "graph_us": graph_ms * 1e3,
                "pct_copy_bw_graph": 100 * kv_bytes / graph_ms / 1e6 / copy_gbs,
            }
            # The reference materialises fp32 K/V for every query head: only where it fits.
            if batch * ctx * HQ * D * 4 * 2 <= ref_limit_bytes:
                q, _, table, lens = calls[0].args[:4]
                row["torch_ref_us"] = (
                    timer(partial(decode_attention_ref, q, kv, table, lens, D**-0.5), reps=5) * 1e3
                )
            rows.append(row)
    return rows


def decode_variants(timer: Timer, copy_gbs: float) -> list[dict]:
    """Tile/split choices, to pick defaults: (batch, context, [(block_n, warps, stages, splits)])."""
    tiles = [(64, 4, 2, None), (32, 4, 3, None), (64, 4, 3, None)]
    splits = [(64, 4, 2, s) for s in (None, 2, 8, 16, 32, 64)]
    configs = [(16, 4096, tiles), (32, 4096, tiles), (1, 32768, tiles), (1, 512, splits), (1, 4096, splits),
               (4, 2048, splits)]  # fmt: skip
    num_blocks = max(b * c for b, c, _ in configs) // BLOCK + 64
    kv = torch.randn(2, num_blocks, BLOCK, HKV, D, dtype=DTYPE, device="cuda")
    rows = []
    for batch, ctx, variants in configs:
        kv_bytes = 2 * batch * ctx * HKV * D * kv.element_size()
        for block_n, warps, stages, num_splits in variants:
            opts = dict(num_splits=num_splits, block_n=block_n, num_warps=warps, num_stages=stages)
            row = {"batch": batch, "context": ctx, **opts}
            try:
                ms = timer.graph(_decode_calls(kv, batch, ctx, num_blocks, **opts))
            except Exception as exc:  # a variant that fails to compile (resources) is reported, not fatal
                rows.append({**row, "error": repr(exc)[:200]})
                continue
            rows.append(
                {**row, "graph_us": ms * 1e3, "pct_copy_bw_graph": 100 * kv_bytes / ms / 1e6 / copy_gbs}
            )
    return rows


def _causal_flops(seq_lens: list[int], query_lens: list[int]) -> float:
    """4 * D * Hq FLOPs per (query, visible key) pair: QK^T and PV, 2 FLOPs per multiply-add."""
    pairs = 0
    for n, q in zip(seq_lens, query_lens, strict=True):
        pairs += sum(p + 1 for p in range(n - q, n))
    return 4.0 * D * HQ * pairs


PREFILL_TILE_VARIANTS = [  # (BLOCK_M, BLOCK_N, num_warps, num_stages); None = the launcher's default
    None, (128, 128, 8, 2), (128, 64, 8, 2), (128, 64, 4, 3), (64, 64, 4, 3), (128, 32, 4, 3), (128, 128, 8, 3),
]  # fmt: skip


def prefill_cases(timer: Timer, variants: bool) -> tuple[list[dict], list[dict]]:
    cases = [  # (name, seq_lens, query_lens)
        ("1 x 4096 prompt", [4096], [4096]),
        ("4 x 2048 prompts", [2048] * 4, [2048] * 4),
        ("8 x 1024 prompts", [1024] * 8, [1024] * 8),
        ("2 x 512 chunk after 8k prefix", [8704] * 2, [512] * 2),
    ]
    rows, variant_rows = [], []
    for name, seq_lens, query_lens in cases:
        blocks = [-(-n // BLOCK) for n in seq_lens]
        num_blocks = sum(blocks) + 8
        kv = torch.randn(2, num_blocks, BLOCK, HKV, D, dtype=DTYPE, device="cuda")
        table = _random_tables(len(seq_lens), max(blocks), num_blocks)[0]
        starts = [0]
        for n in query_lens:
            starts.append(starts[-1] + n)
        qsl = torch.tensor(starts, dtype=torch.int32, device="cuda")
        lens = torch.tensor(seq_lens, dtype=torch.int32, device="cuda")
        q = torch.randn(starts[-1], HQ, D, dtype=DTYPE, device="cuda")
        args = (q, kv, qsl, lens, table, D**-0.5)
        flops = _causal_flops(seq_lens, query_lens)
        ms = timer(partial(prefill_attention, *args, max(query_lens)))
        row = {"case": name, "us": ms * 1e3, "TFLOPs": flops / ms / 1e9}
        row["torch_ref_us"] = timer(partial(prefill_attention_ref, *args), reps=3, warmup=1) * 1e3
        if all(n == q for n, q in zip(seq_lens, query_lens, strict=True)) and len(set(seq_lens)) == 1:
            # Peer on dense, contiguous data (no paging): torch SDPA, causal, GQA expanded.
            b, n = len(seq_lens), seq_lens[0]
            qd, kd, vd = (torch.randn(b, HQ, n, D, dtype=DTYPE, device="cuda") for _ in range(3))
            sdpa_ms = timer(partial(F.scaled_dot_product_attention, qd, kd, vd, is_causal=True))
            row["torch_sdpa_dense_us"] = sdpa_ms * 1e3
            row["torch_sdpa_dense_TFLOPs"] = flops / sdpa_ms / 1e9
        rows.append(row)
        if variants and name in ("1 x 4096 prompt", "2 x 512 chunk after 8k prefix"):
            for tiles in PREFILL_TILE_VARIANTS:
                vrow = {"case": name, "tiles": str(tiles)}
                try:
                    vms = timer(partial(prefill_attention, *args, max(query_lens), tile_config=tiles))
                except Exception as exc:  # out of shared memory etc.: reported, not fatal
                    variant_rows.append({**vrow, "error": repr(exc)[:200]})
                    continue
                variant_rows.append({**vrow, "us": vms * 1e3, "TFLOPs": flops / vms / 1e9})
    return rows, variant_rows


def pointwise_cases(timer: Timer) -> list[dict]:
    t, hidden, inter = 4096, 4096, 14336
    x = torch.randn(t, hidden, dtype=DTYPE, device="cuda")
    res = torch.randn(t, hidden, dtype=DTYPE, device="cuda")
    w = torch.randn(hidden, dtype=DTYPE, device="cuda")
    gate_up = torch.randn(t, 2 * inter, dtype=DTYPE, device="cuda")
    qkv = torch.randn(t, HQ + 2 * HKV, D, dtype=DTYPE, device="cuda")
    q, k = qkv[:, :HQ], qkv[:, HQ : HQ + HKV]
    cos, sin = rotary_cos_sin(D, 8192, 500000.0, "cuda")
    pos = torch.randint(0, 8192, (t,), device="cuda")
    num_blocks = 2 * t // BLOCK
    cache = torch.randn(2, num_blocks, BLOCK, HKV, D, dtype=DTYPE, device="cuda")
    slots = torch.randperm(num_blocks * BLOCK, device="cuda")[:t]
    kk, vv = qkv[:, HQ : HQ + HKV], qkv[:, HQ + HKV :]
    e = x.element_size()
    cases = [  # (name, kernel, reference, bytes moved by the kernel)
        ("rms_norm [4096, 4096]", lambda: rms_norm(x, w, 1e-5), lambda: rms_norm_ref(x, w, 1e-5), 2 * t * hidden * e),
        ("fused_add_rms_norm [4096, 4096]", lambda: fused_add_rms_norm(x, res, w, 1e-5),
         lambda: fused_add_rms_norm_ref(x, res, w, 1e-5), 4 * t * hidden * e),
        ("silu_and_mul [4096, 2x14336]", lambda: silu_and_mul(gate_up), lambda: silu_and_mul_ref(gate_up), 3 * t * inter * e),
        ("rotary q,k [4096, 32+8, 128]", lambda: apply_rotary(q, k, pos, cos, sin),
         lambda: apply_rotary_ref(q, k, pos, cos, sin), 2 * t * (HQ + HKV) * D * e),
        ("kv_write [4096, 8, 128]", lambda: kv_write(kk, vv, cache, slots), lambda: kv_write_ref(kk, vv, cache, slots),
         4 * t * HKV * D * e),
    ]  # fmt: skip
    rows = []
    for name, kernel, ref, nbytes in cases:
        ms = timer(kernel, reps=50)
        ref_ms = timer(ref, reps=20)
        rows.append({"case": name, "us": ms * 1e3, "GBps": nbytes / ms / 1e6, "torch_ref_us": ref_ms * 1e3})
    return rows


GEMV_SHAPES = [  # (model, linear, N, K): x [1, K] @ W[N, K]^T, bf16
    ("8B", "qkv", 6144, 4096), ("8B", "o_proj", 4096, 4096), ("8B", "gate_up", 28672, 4096),
    ("8B", "down", 4096, 14336), ("8B", "lm_head", 128256, 4096),
    ("1B", "qkv", 3072, 2048), ("1B", "o_proj", 2048, 2048), ("1B", "gate_up", 16384, 2048),
    ("1B", "down", 2048, 8192), ("1B", "lm_head", 128256, 2048),
]  # fmt: skip

GEMV_VARIANTS = [  # CUDA-core tiles (skipped where the accumulator would spill) and tensor-core tiles
    *(GemvConfig(bn, bk, 1, w) for bn in (1, 2, 4) for bk in (512, 1024, 2048) for w in (4, 8)),
    *(GemvConfig(bn, bk, 1, 4, st, tensor_cores=True) for bn in (16, 32, 64) for bk in (256, 512) for st in (3, 4)),
    GemvConfig(1, 1024, 2), GemvConfig(32, 512, 2, 4, 3, tensor_cores=True),
    GemvConfig(32, 512, 4, 4, 3, tensor_cores=True),
]  # fmt: skip


def _config_name(cfg: GemvConfig) -> str:
    kind = "tc" if cfg.tensor_cores else "fma"
    return f"{kind} {cfg.block_n}x{cfg.block_k} s{cfg.split_k} w{cfg.num_warps} st{cfg.num_stages}"


def _gemv_weights(n: int, k: int, min_bytes: int = 160 << 20, max_copies: int = 16) -> list[torch.Tensor]:
    """Enough distinct weights that calls back to back in a graph miss in L2, like successive layers."""
    copies = max(1, min(max_copies, -(-min_bytes // (n * k * 2))))
    return [torch.randn(n, k, dtype=DTYPE, device="cuda") for _ in range(copies)]


def gemv_cases(timer: Timer, copy_gbs: float, rows_list: tuple[int, ...] = (1, 2, 4)) -> list[dict]:
    dispatch = GemvDispatch("cuda")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    out = []
    for rows in rows_list:
        for model, name, n, k in GEMV_SHAPES:
            ws = _gemv_weights(n, k)
            x = torch.randn(rows, k, dtype=DTYPE, device="cuda")
            want = F.linear(x, ws[0]).float()
            if (gemv(x, ws[0]).float() - want).norm() > 1e-2 * want.norm():
                raise AssertionError(f"gemv differs from F.linear on {model} {name} M={rows}")
            nbytes = n * k * 2
            torch_ms, gemv_ms = timer(partial(F.linear, x, ws[0])), timer(partial(gemv, x, ws[0]))
            torch_graph_ms = timer.graph([partial(F.linear, x, w) for w in ws])
            gemv_graph_ms = timer.graph([partial(gemv, x, w) for w in ws])
            (choice,) = dispatch.prepare([GemvShape(rows, n, k, DTYPE)], weights={(n, k, DTYPE): ws[0]})
            out.append({
                "case": f"{model} {name} N={n} K={k}", "M": rows, "MB": nbytes / 1e6,
                "config": _config_name(gemv_config(rows, n, k, 2, sms)),
                "torch_us": torch_ms * 1e3, "torch_TBps": nbytes / torch_ms / 1e9,
                "gemv_us": gemv_ms * 1e3, "gemv_TBps": nbytes / gemv_ms / 1e9,
                "torch_graph_us": torch_graph_ms * 1e3, "torch_graph_TBps": nbytes / torch_graph_ms / 1e9,
                "gemv_graph_us": gemv_graph_ms * 1e3, "gemv_graph_TBps": nbytes / gemv_graph_ms / 1e9,
                "pct_copy_bw_gemv_graph": 100 * nbytes / gemv_graph_ms / 1e6 / copy_gbs,
                "pick": "gemv" if choice.use_gemv else "F.linear",
                "pick_gemv_us": choice.gemv_us, "pick_torch_us": choice.torch_us,
            })  # fmt: skip
    return out


def gemv_variants(timer: Timer, rows_list: tuple[int, ...] = (1, 2, 4)) -> list[dict]:
    """Every tile variant on every shape (graph-timed over distinct weights), to tune ``gemv_config``."""
    out = []
    for model, name, n, k in GEMV_SHAPES:
        ws = _gemv_weights(n, k)
        nbytes = n * k * 2
        for rows in rows_list:
            x = torch.randn(rows, k, dtype=DTYPE, device="cuda")
            for cfg in GEMV_VARIANTS:
                acc = (16 if cfg.tensor_cores else rows * cfg.block_k) * cfg.block_n
                if acc > 128 * 32 * cfg.num_warps or (cfg.block_k > 1024 and rows > 1):
                    continue  # the accumulator would spill
                row = {"case": f"{model} {name}", "M": rows, "config": _config_name(cfg)}
                try:
                    ms = timer.graph([partial(gemv, x, w, config=cfg) for w in ws], reps=10)
                except Exception as exc:  # a variant that fails to compile is reported, not fatal
                    out.append({**row, "error": repr(exc)[:200]})
                    continue
                out.append({**row, "graph_us": ms * 1e3, "TBps": nbytes / ms / 1e9})
    return out


def _print_table(title: str, rows: list[dict], cols: list[str]) -> None:
    widths = [
        34 if c in ("case", "tiles", "error") else 26 if c == "config" else max(len(c), 8) for c in cols
    ]
    print(f"\n{title}")
    print("  ".join(f"{c:>{w}}" for c, w in zip(cols, widths, strict=True)))
    for r in rows:
        cells = []
        for c, w in zip(cols, widths, strict=True):
            v = r.get(c, "")
            fmt = ".2f" if c.endswith("TBps") else ".1f"
            cells.append(f"{v:>{w}{fmt}}" if isinstance(v, float) else f"{str(v)[:w]:>{w}}")
        print("  ".join(cells))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="bench_results/gpu_kernels.json")
    parser.add_argument("--quick", action="store_true", help="fewer contexts and batches")
    parser.add_argument(
        "--variants", action="store_true", help="also sweep decode/prefill/gemv tile variants"
    )
    parser.add_argument(
        "--sections",
        default="decode,prefill,pointwise,gemv",
        help="comma list of sections to run (ceilings always run)",
    )
    args = parser.parse_args()
    sections = set(args.sections.split(","))
    unknown = sections - {"decode", "prefill", "pointwise", "gemv"}
    if unknown:
        raise SystemExit(f"unknown sections {sorted(unknown)}")
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU")
    torch.manual_seed(0)
    timer = Timer()
    props = torch.cuda.get_device_properties(0)
    import triton

    result: dict = {
        "device": props.name,
        "sms": props.multi_processor_count,
        "torch": torch.__version__,
        "triton": triton.__version__,
    }
    result["ceilings"] = ceilings(timer)
    copy_gbs = result["ceilings"]["copy_GBps"]
    contexts = [512, 4096, 32768] if args.quick else [512, 1024, 2048, 4096, 8192, 16384, 32768]
    batches = [1, 16] if args.quick else [1, 16, 64]
    if "decode" in sections:
        result["decode_attention"] = decode_sweep(timer, copy_gbs, contexts, batches, ref_limit_bytes=4 * GIB)
        if args.variants:
            result["decode_variants"] = decode_variants(timer, copy_gbs)
    if "prefill" in sections:
        result["prefill_attention"], prefill_variants = prefill_cases(timer, args.variants)
        if args.variants:
            result["prefill_variants"] = prefill_variants
    if "pointwise" in sections:
        result["pointwise"] = pointwise_cases(timer)
    if "gemv" in sections:
        result["gemv"] = gemv_cases(timer, copy_gbs)
        if args.variants:
            result["gemv_variants"] = gemv_variants(timer)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))

    print(
        f"\n{props.name} ({props.multi_processor_count} SMs), torch {torch.__version__}, triton {triton.__version__}"
    )
    c = result["ceilings"]
    print(
        f"copy bandwidth {c['copy_GBps']:.0f} GB/s (4 GiB, read + write); bf16 matmul {c['matmul_bf16_TFLOPs']:.0f} TFLOP/s"
    )
    if "gemv_variants" in result:
        _print_table("gemv variants (bf16, graph-timed)", result["gemv_variants"],
                     ["case", "M", "config", "graph_us", "TBps", "error"])  # fmt: skip
    if "decode_variants" in result:
        _print_table("decode variants", result["decode_variants"],
                     ["batch", "context", "block_n", "num_warps", "num_stages", "num_splits", "graph_us", "pct_copy_bw_graph", "error"])  # fmt: skip
    if "prefill_variants" in result:
        _print_table(
            "prefill variants", result["prefill_variants"], ["case", "tiles", "us", "TFLOPs", "error"]
        )
    if "prefill_attention" in result:
        _print_table("prefill attention (Llama-3.1-8B heads, bf16, block 16)", result["prefill_attention"],
                     ["case", "us", "TFLOPs", "torch_sdpa_dense_TFLOPs", "torch_ref_us"])  # fmt: skip
    if "pointwise" in result:
        _print_table("fused ops (bf16)", result["pointwise"], ["case", "us", "GBps", "torch_ref_us"])
    if "gemv" in result:
        _print_table("gemv, bf16 (TB/s of weight read; graph = back to back over distinct weights)", result["gemv"],
                     ["case", "M", "config", "torch_us", "torch_TBps", "gemv_us", "gemv_TBps", "torch_graph_us",
                      "torch_graph_TBps", "gemv_graph_us", "gemv_graph_TBps", "pick"])  # fmt: skip
    if "decode_attention" in result:
        _print_table("decode attention (Llama-3.1-8B heads, bf16, block 16; % of copy bandwidth)", result["decode_attention"],
                     ["batch", "context", "splits", "us", "pct_copy_bw", "graph_calls", "graph_us", "pct_copy_bw_graph", "torch_ref_us"])  # fmt: skip
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
