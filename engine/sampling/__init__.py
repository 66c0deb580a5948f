"""Sampling parameters and the batched sampler (import the sampler from ``engine.sampling.sampler``)."""

from engine.sampling.params import SamplingParams

__all__ = ["SamplingParams"]
