"""GEMV for a few rows: ``y [M, N] = x [M, K] @ weight [N, K]^T (+ bias)``, M small (decode).

``weight`` is in ``nn.Linear`` layout (row-major ``[N, K]``). Accumulation is in fp32; the output
has ``x``'s dtype. With one to four rows the product is bound by reading the weight once, so the
kernel is built for bandwidth rather than for FLOPs:

* Every program reads ``BLOCK_N`` whole weight rows (or one K-slice of them) with wide loads along
  K (``BLOCK_K`` contiguous elements per row and step); all ``M`` rows of ``x`` are applied to each
  weight tile, so the weight is read exactly once whatever ``M`` is.
* Two kernels: on CUDA cores (``_gemv_kernel``), products accumulate elementwise in a
  ``[BLOCK_M, BLOCK_N, BLOCK_K]`` fp32 tile reduced over K once, after the loop; on tensor cores
  (``_gemv_dot_kernel``), x is padded to 16 rows and the weight tiles are prefetched through
  shared memory in several stages. One row is fastest on CUDA cores with one weight row per
  program; three or four rows on tensor cores (measured; see :func:`gemv_config`).
* Small ``BLOCK_N`` (and, where N is small and K long, split-K) gives enough programs to keep all
  SMs streaming even for N = 2048. Split-K writes fp32 partials ``[SPLIT_K, M, N]`` that a second
  kernel sums in a fixed order: the result is deterministic, run to run (no atomics).
* The tile sizes come from a small fixed table (:func:`gemv_config`), never from autotuning, so a
  launch depends only on shapes: no host sync, CUDA-graph capturable (the split-K workspace comes
  from torch's caching allocator, which graph capture handles).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from engine.kernels._common import FLOAT_DTYPES, check_device, check_tensor, dot_upcast, next_pow2, sm_count

MAX_ROWS = 16  # the kernel is correct for any M up to this; it is only fast for a handful of rows


@dataclass(frozen=True)
class GemvConfig:
    """Tile choice of one launch. ``split_k`` is an upper bound: splits that would be empty are dropped."""

    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 1
    tensor_cores: bool = False  # rows padded to 16 and multiplied by tl.dot (see _gemv_dot_kernel)

    def __post_init__(self) -> None:
        for name in ("block_n", "block_k"):
            v = getattr(self, name)
            if v < 1 or v & (v - 1):
                raise ValueError(f"{name} must be a power of two, got {v}")
        if self.split_k < 1 or self.num_warps < 1 or self.num_stages < 1:
            raise ValueError(f"split_k, num_warps and num_stages must be >= 1, got {self}")
        if self.tensor_cores and min(self.block_n, self.block_k) < 16:
            raise ValueError(f"tensor-core tiles need block_n and block_k >= 16, got {self}")


@triton.jit
def _gemv_kernel(
    x_ptr,
    w_ptr,
    bias_ptr,
    out_ptr,  # [M, N] in x's dtype when SPLIT_K == 1, else fp32 partials [SPLIT_K, M, N]
    M,
    N,
    K,
    k_per_split,  # a multiple of BLOCK_K
    stride_xm,
    stride_wn,
    stride_os,
    stride_om,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    EVEN_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    m = tl.arange(0, BLOCK_M)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    kk = tl.arange(0, BLOCK_K)
    # Rows past N re-read row N-1 instead of being masked, so weight loads stay unmasked and
    # vectorised; their results are never stored.
    n_load = tl.minimum(n, N - 1).to(tl.int64)
    w_rows = w_ptr + n_load[None, :, None] * stride_wn  # [1, BN, 1]
    x_rows = x_ptr + m.to(tl.int64)[:, None, None] * stride_xm  # [BM, 1, 1]
    x_row_ok = (m < M)[:, None, None]

    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    acc = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        k0 = tl.multiple_of(k0, BLOCK_K)
        cols = (k0 + kk)[None, None, :]  # [1, 1, BK]
        if EVEN_K:
            w = tl.load(w_rows + cols)
            x = tl.load(x_rows + cols, mask=x_row_ok, other=0.0)
        else:
            col_ok = cols < k_end
            w = tl.load(w_rows + cols, mask=col_ok, other=0.0)
            x = tl.load(x_rows + cols, mask=x_row_ok & col_ok, other=0.0)
        acc += x.to(tl.float32) * w.to(tl.float32)
    _store_tile(
        tl.sum(acc, axis=2), m, n, M, N, pid_k, bias_ptr, out_ptr, stride_os, stride_om, SPLIT_K, HAS_BIAS
    )


@triton.jit
def _store_tile(
    y,
    m,
    n,
    M,
    N,
    pid_k,
    bias_ptr,
    out_ptr,
    stride_os,
    stride_om,
    SPLIT_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    """``y [BM, BN]`` fp32 -> the output (bias added, rounded) or this split's fp32 partial."""
    mask = (m < M)[:, None] & (n < N)[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            y += tl.load(bias_ptr + n, mask=n < N, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + m[:, None] * stride_om + n[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(out_ptr + pid_k * stride_os + m[:, None] * stride_om + n[None, :], y, mask=mask)


@triton.jit
def _gemv_dot_kernel(
    x_ptr,
    w_ptr,
    bias_ptr,
    out_ptr,
    M,
    N,
    K,
    k_per_split,
    stride_xm,
    stride_wn,
    stride_os,
    stride_om,
    BLOCK_M: tl.constexpr,  # 16: the smallest tl.dot; rows >= M are zeros and never stored
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    EVEN_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE_DOT: tl.constexpr,
):
    """The same product on tensor cores: ``x [16, BK] @ w[BN, BK]^T`` per step. The weight tile
    is a dot operand, so the compiler stages it through shared memory and, with
    ``num_stages > 1``, prefetches the next tiles asynchronously; x's padding rows are masked
    loads (no traffic)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    m = tl.arange(0, BLOCK_M)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    kk = tl.arange(0, BLOCK_K)
    n_load = tl.minimum(n, N - 1).to(tl.int64)
    w_rows = w_ptr + n_load[:, None] * stride_wn  # [BN, 1]
    x_rows = x_ptr + m.to(tl.int64)[:, None] * stride_xm  # [16, 1]
    x_row_ok = (m < M)[:, None]

    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        k0 = tl.multiple_of(k0, BLOCK_K)
        cols = (k0 + kk)[None, :]
        if EVEN_K:
            w = tl.load(w_rows + cols)
            x = tl.load(x_rows + cols, mask=x_row_ok, other=0.0)
        else:
            w = tl.load(w_rows + cols, mask=cols < k_end, other=0.0)
            x = tl.load(x_rows + cols, mask=x_row_ok & (cols < k_end), other=0.0)
        if UPCAST:
            x, w = x.to(tl.float32), w.to(tl.float32)
        if IEEE_DOT:
            acc = tl.dot(x, tl.trans(w), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, tl.trans(w), acc)
    _store_tile(acc, m, n, M, N, pid_k, bias_ptr, out_ptr, stride_os, stride_om, SPLIT_K, HAS_BIAS)


@triton.jit
def _gemv_reduce_kernel(
    part_ptr,  # fp32 [SPLIT_K, M, N], contiguous
    bias_ptr,
    out_ptr,
    N,
    stride_ps,
    stride_om,
    SPLIT_K: tl.constexpr,
    BLOCK: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    row = tl.program_id(0)
    n = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = n < N
    y = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):  # fixed order: deterministic
        y += tl.load(part_ptr + s * stride_ps + row * N + n, mask=mask, other=0.0)
    if HAS_BIAS:
        y += tl.load(bias_ptr + n, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_om + n, y.to(out_ptr.dtype.element_ty), mask=mask)


def gemv_config(m: int, n: int, k: int, elem_size: int, num_sms: int) -> GemvConfig:
    """The fixed tile table, from a sweep of the Llama-3.1-8B / 3.2-1B decode shapes on an H100
    (``benchmarks/gpu_kernels_bench.py --sections gemv --variants``):

    * one row: CUDA cores, one weight row per program, 1024 columns (one 16-byte load a thread)
      per step. N programs keep every SM busy down to N = 2048, and each SM holds enough of
      these small programs to keep its loads in flight. Within 3% of the best tile on every shape.
    * two rows: CUDA cores, four weight rows per program (x is re-read once per four rows).
    * three or four rows: tensor cores on 32 x 512 weight tiles with three stages of asynchronous
      prefetch (x is padded to 16 rows; the padding costs registers, not memory traffic).
    * split K only where N alone would leave SMs idle and every split keeps 8+ tiles of K.
    """
    if m == 1:
        block_n, block_k = 1, 1024
        config = dict(num_warps=4, num_stages=1)
    elif m == 2:
        block_n, block_k = 4, 1024
        config = dict(num_warps=4, num_stages=1)
    else:
        block_n, block_k = 32, 512 if elem_size <= 2 else 256  # 3 stages of fp32 tiles fit in shared memory
        config = dict(num_warps=4, num_stages=3, tensor_cores=True)
    block_k = min(block_k, max(16, next_pow2(k)))
    programs = triton.cdiv(n, block_n)
    split_k = 1
    while programs * split_k < num_sms and k >= 16 * block_k * split_k and split_k < 16:
        split_k *= 2
    return GemvConfig(block_n=block_n, block_k=block_k, split_k=split_k, **config)


def gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    config: GemvConfig | None = None,
) -> torch.Tensor:
    """``x [M, K] @ weight[N, K]^T + bias[N]`` -> ``[M, N]`` in ``x``'s dtype (fp32 accumulation).

    ``x``, ``weight`` and ``bias`` share one dtype (as ``F.linear`` requires). ``M`` may be at most
    :data:`MAX_ROWS`; the kernel is meant for 1..4 rows. ``config`` overrides the tile table
    (benchmarks use it)."""
    device = check_device(x)
    check_tensor("x", x, ndim=2, dtypes=FLOAT_DTYPES, device=device)
    check_tensor("weight", weight, ndim=2, dtypes=(x.dtype,), device=device)
    rows, k = x.shape
    n = weight.shape[0]
    if weight.shape[1] != k:
        raise ValueError(f"weight is {tuple(weight.shape)} but x has K={k} columns")
    if bias is not None:
        check_tensor("bias", bias, ndim=1, dtypes=(x.dtype,), device=device)
        if bias.shape[0] != n:
            raise ValueError(f"bias has {bias.shape[0]} entries for N={n} outputs")
    if rows > MAX_ROWS:
        raise ValueError(f"gemv takes at most {MAX_ROWS} rows, got {rows}; use F.linear")
    out = torch.empty((rows, n), dtype=x.dtype, device=device)
    if rows == 0 or n == 0:
        return out
    if k == 0:
        return out.zero_() if bias is None else out.copy_(bias.expand(rows, n))
    if config is None:
        config = gemv_config(rows, n, k, x.element_size(), sm_count(device))
    block_k = min(config.block_k, max(16, next_pow2(k)))
    k_per_split = triton.cdiv(triton.cdiv(k, config.split_k), block_k) * block_k
    split_k = triton.cdiv(k, k_per_split)  # no empty splits
    grid = (triton.cdiv(n, config.block_n), split_k)
    common = dict(
        BLOCK_N=config.block_n,
        BLOCK_K=block_k,
        SPLIT_K=split_k,
        EVEN_K=k % block_k == 0,  # k_per_split is a multiple of block_k: every tile is full
        HAS_BIAS=bias is not None,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    if config.tensor_cores:
        kernel = _gemv_dot_kernel
        upcast = dot_upcast()
        common.update(BLOCK_M=16, UPCAST=upcast, IEEE_DOT=upcast or x.dtype == torch.float32)
    else:
        kernel = _gemv_kernel
        common.update(BLOCK_M=next_pow2(rows))
    bias_arg = bias if bias is not None else x
    target = out if split_k == 1 else torch.empty((split_k, rows, n), dtype=torch.float32, device=device)
    kernel[grid](
        x, weight, bias_arg, target, rows, n, k, k_per_split,
        x.stride(0), weight.stride(0), target.stride(0) if split_k > 1 else 0, target.stride(-2),
        **common,
    )  # fmt: skip
    if split_k == 1:
        return out
    block = min(1024, next_pow2(n))
    _gemv_reduce_kernel[(rows, triton.cdiv(n, block))](
        target, bias_arg, out, n, target.stride(0), out.stride(0),
        SPLIT_K=split_k, BLOCK=block, HAS_BIAS=bias is not None, num_warps=4,
    )  # fmt: skip
    return out


def gemv_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Plain-torch reference: the product and the bias in fp32, rounded once to ``x``'s dtype."""
    y = x.float() @ weight.float().t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)
