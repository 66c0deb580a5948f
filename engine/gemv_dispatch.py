"""Per-shape choice between the Triton GEMV and ``F.linear`` (cuBLAS) for few-row linears.

At batch 1..4 a decode step is bound by reading the weights, and cuBLAS reads some shapes far
below the card's bandwidth while the GEMV reads others slower than cuBLAS. Which one wins depends
on the shape and the card, so it is measured, once per shape, before any CUDA graph is captured:

    dispatch = GemvDispatch(device)
    install_gemv(model, dispatch)       # nn.Linear -> GemvLinear (same parameters, same names)
    dispatch.prepare_modules(model)     # times each (M, N, K, dtype, bias) for M in rows
    ... capture graphs, run steps ...   # every linear calls dispatch.linear

Invariants:
  * ``linear`` never times, allocates a timing buffer or syncs with the host: a shape that was
    not prepared simply runs ``F.linear``. So ``linear`` is safe inside CUDA-graph capture.
  * ``prepare`` refuses to run while the current stream is capturing.
  * One ``GemvDispatch`` serves one device (its measurements are of that card).
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from engine.kernels.gemv import gemv

logger = logging.getLogger(__name__)

DEFAULT_ROWS = (1, 2, 4)  # the decode CUDA-graph buckets a GEMV can serve


@dataclass(frozen=True)
class GemvShape:
    """One linear call's shape: ``x [m, k] @ weight[n, k]^T (+ bias)``."""

    m: int
    n: int
    k: int
    dtype: torch.dtype
    has_bias: bool = False


Measure = Callable[["GemvShape", torch.Tensor | None], tuple[float, float]]


@dataclass(frozen=True)
class GemvChoice:
    """The measurement behind one decision (median microseconds over the timed repetitions)."""

    shape: GemvShape
    use_gemv: bool
    gemv_us: float
    torch_us: float


class GemvDispatch:
    """Remembers, per :class:`GemvShape`, whether the Triton GEMV beat ``F.linear`` on this card.

    ``max_rows``: calls with more rows always go to ``F.linear``. ``reps``/``warmup``: timing
    repetitions per candidate (median of ``reps`` CUDA-event timings, L2 flushed before each).
    """

    def __init__(
        self,
        device: torch.device | str,
        *,
        max_rows: int = 4,
        reps: int = 20,
        warmup: int = 5,
        measure: Measure | None = None,
    ) -> None:
        """``measure(shape, weight)`` -> ``(gemv_us, torch_us)`` replaces the CUDA-event timing
        (tests use it); ``weight`` is the model's own or None."""
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        if measure is None and self.device.type != "cuda":
            raise ValueError(f"GemvDispatch times kernels on a CUDA device, got {self.device}")
        self.max_rows, self.reps, self.warmup = max_rows, reps, warmup
        self._measure_fn = measure
        self._choices: dict[GemvShape, GemvChoice] = {}
        self._use_gemv: dict[tuple[int, int, int, torch.dtype, bool], bool] = {}

    # --- the hot path -----------------------------------------------------------------------
    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``F.linear(x, weight, bias)``, through the GEMV where it was measured faster."""
        if x.dim() == 2 and x.shape[0] <= self.max_rows and x.stride(1) == 1:
            key = (x.shape[0], weight.shape[0], x.shape[1], x.dtype, bias is not None)
            if self._use_gemv.get(key, False):
                return gemv(x, weight, bias)
        return F.linear(x, weight, bias)

    def choice(self, shape: GemvShape) -> GemvChoice | None:
        return self._choices.get(shape)

    @property
    def choices(self) -> tuple[GemvChoice, ...]:
        return tuple(self._choices.values())

    # --- measuring (outside capture) ----------------------------------------------------------
    def prepare(
        self,
        shapes: Iterable[GemvShape],
        *,
        weights: dict[tuple[int, int, torch.dtype], torch.Tensor] | None = None,
    ) -> list[GemvChoice]:
        """Time GEMV and ``F.linear`` for every new shape and remember the faster.

        ``weights`` maps ``(n, k, dtype)`` to an existing weight to time on (a model's own, so no
        copy of a large matrix is allocated); other shapes get a random weight for the timing.
        Shapes already prepared or with ``m > max_rows`` are skipped. Returns the new choices."""
        if self.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("GemvDispatch.prepare must run before CUDA-graph capture, not during it")
        todo = [s for s in dict.fromkeys(shapes) if s not in self._choices and 1 <= s.m <= self.max_rows]
        if not todo:
            return []
        weights = weights or {}
        measure = self._measure_fn or _CudaMeasure(self.device, self.reps, self.warmup)
        new = []
        for shape in todo:
            gemv_us, torch_us = measure(shape, weights.get((shape.n, shape.k, shape.dtype)))
            choice = GemvChoice(shape, gemv_us < torch_us, gemv_us, torch_us)
            self._choices[shape] = choice
            self._use_gemv[(shape.m, shape.n, shape.k, shape.dtype, shape.has_bias)] = choice.use_gemv
            new.append(choice)
            logger.info(
                "linear M=%d N=%d K=%d %s: gemv %.1f us, F.linear %.1f us -> %s",
                shape.m, shape.n, shape.k, shape.dtype, gemv_us, torch_us, "gemv" if choice.use_gemv else "F.linear",
            )  # fmt: skip
        return new

    def prepare_modules(self, model: nn.Module, rows: Iterable[int] = DEFAULT_ROWS) -> list[GemvChoice]:
        """:meth:`prepare` every distinct linear of ``model`` for each row count in ``rows``,
        timed on the model's own weights."""
        shapes, weights = [], {}
        for module in model.modules():
            if isinstance(module, nn.Linear) and module.weight.device == self.device:
                w = module.weight
                weights.setdefault((w.shape[0], w.shape[1], w.dtype), w.detach())
                for m in rows:
                    shapes.append(GemvShape(m, w.shape[0], w.shape[1], w.dtype, module.bias is not None))
        return self.prepare(shapes, weights=weights)


class _CudaMeasure:
    """Median CUDA-event times of both candidates, in microseconds, L2 flushed (by a read) before
    each repetition so the weight comes from device memory, as it does inside a decode step."""

    def __init__(self, device: torch.device, reps: int, warmup: int) -> None:
        l2_bytes = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or (64 << 20)
        self.device, self.reps, self.warmup = device, reps, warmup
        self._flush = torch.ones(2 * l2_bytes, dtype=torch.uint8, device=device)

    def __call__(self, shape: GemvShape, weight: torch.Tensor | None) -> tuple[float, float]:
        with torch.inference_mode(), torch.cuda.device(self.device):
            if weight is None:
                weight = torch.randn(shape.n, shape.k, device=self.device).to(shape.dtype)
            x = torch.randn(shape.m, shape.k, device=self.device).to(shape.dtype)
            bias = torch.randn(shape.n, device=self.device).to(shape.dtype) if shape.has_bias else None
            torch_us = self._time(lambda: F.linear(x, weight, bias))
            try:
                gemv_us = self._time(lambda: gemv(x, weight, bias))
            except Exception as exc:  # e.g. tiles that need more shared memory than this card has
                logger.warning("gemv failed on %s (%s); F.linear serves it", shape, exc)
                gemv_us = float("inf")
            return gemv_us, torch_us

    def _time(self, fn: Callable[[], object]) -> float:
        for _ in range(self.warmup):
            fn()
        events = []
        for _ in range(self.reps):
            self._flush.sum(dtype=torch.int32)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            events.append((start, end))
        torch.cuda.synchronize(self.device)
        return 1e3 * statistics.median(s.elapsed_time(e) for s, e in events)


class GemvLinear(nn.Linear):
    """An ``nn.Linear`` whose forward goes through a :class:`GemvDispatch`.

    Built around an existing linear's parameters (the same ``Parameter`` objects, under the same
    names), so weight loading, tied embeddings and ``state_dict`` are unchanged."""

    def __init__(self, linear: nn.Linear, dispatch: GemvDispatch) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.register_parameter("bias", linear.bias)  # None stays a registered (empty) parameter slot
        self.dispatch = dispatch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dispatch.linear(x, self.weight, self.bias)


def install_gemv(model: nn.Module, dispatch: GemvDispatch) -> int:
    """Replace every plain ``nn.Linear`` of ``model`` (in place) by a :class:`GemvLinear` on
    ``dispatch``. Returns how many were replaced; a second call replaces none."""
    replaced = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                setattr(module, name, GemvLinear(child, dispatch))
                replaced += 1
    return replaced
