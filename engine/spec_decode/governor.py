"""Speculation on or off, by measured throughput: the adaptive policy's safety net.

The policy (``policy.py``) sizes drafts from a fitted cost model. A model can be wrong: on a GPU a
step's cost is nearly flat in its rows until a CUDA-graph bucket ends, and the host work of
verification (per request, in Python) is not in it. The governor therefore compares what actually
happened: per batch-size class (the number of running requests, rounded down to a power of two) it
keeps an exponential average of output tokens per second over decode-only steps with speculation on
and with it off. Until both modes have ``min_samples`` steps in a class they alternate; afterwards
the faster mode runs, and the slower one is re-measured for ``explore_steps`` steps out of every
``explore_period`` so a change of workload (better or worse drafts) is noticed. A wrong choice thus
costs at most the exploration share, about ``explore_steps / explore_period`` of the steps.

A step's time runs from the start of proposing to the end of the engine's update, so the proposer's
and the verifier's host time count against speculation. A step with speculation on but no draft
proposed is not recorded: it says nothing about what drafts are worth, and until drafts appear the
class keeps trying speculation.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GovernorConfig:
    min_samples: int = 4  # steps of each mode in a class before choosing
    explore_period: int = 64  # once decided, re-measure the other mode this often (in steps)...
    explore_steps: int = 2  # ...for this many steps
    smoothing: float = 0.2  # weight of a new measurement in the averages
    margin: float = 1.02  # speculation must be this much faster to stay on


class _ClassStats:
    __slots__ = ("rate", "samples", "steps_since_explore")

    def __init__(self) -> None:
        self.rate = {True: 0.0, False: 0.0}  # tokens per second, speculation on / off
        self.samples = {True: 0, False: 0}
        self.steps_since_explore = 0


class SpecGovernor:
    def __init__(self, config: GovernorConfig | None = None) -> None:
        self.config = config or GovernorConfig()
        self._classes: dict[int, _ClassStats] = {}

    @staticmethod
    def batch_class(num_running: int) -> int:
        return max(1, num_running).bit_length()

    def _stats(self, num_running: int) -> _ClassStats:
        key = self.batch_class(num_running)
        stats = self._classes.get(key)
        if stats is None:
            stats = self._classes[key] = _ClassStats()
        return stats

    def preferred(self, num_running: int) -> bool | None:
        """The faster mode of this class once both are measured (None before)."""
        s, cfg = self._stats(num_running), self.config
        if min(s.samples.values()) < cfg.min_samples:
            return None
        return s.rate[True] > cfg.margin * s.rate[False]

    def choose(self, num_running: int) -> bool:
        """Whether this step speculates."""
        s, cfg = self._stats(num_running), self.config
        best = self.preferred(num_running)
        if best is None:
            return s.samples[True] <= s.samples[False]  # alternate, speculation first
        s.steps_since_explore += 1
        if s.steps_since_explore > cfg.explore_period:
            if s.steps_since_explore > cfg.explore_period + cfg.explore_steps:
                s.steps_since_explore = 0
            return not best
        return best

    def record(self, num_running: int, speculated: bool, tokens: int, seconds: float) -> None:
        """A decode-only step's outcome: ``tokens`` emitted in ``seconds`` of wall time."""
        if seconds <= 0 or tokens <= 0:
            return
        s, cfg = self._stats(num_running), self.config
        rate = tokens / seconds
        n = s.samples[speculated]
        # Plain average over the first samples, exponential afterwards.
        weight = max(cfg.smoothing, 1.0 / (n + 1))
        s.rate[speculated] += weight * (rate - s.rate[speculated])
        s.samples[speculated] = n + 1
