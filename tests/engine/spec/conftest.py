"""Shared tiny models for the speculative-decoding tests: a target and a *different* draft (same
vocabulary), as HF-named weights, built once per session."""

from __future__ import annotations

import pytest

from tests.engine.oracle import TINY_LLAMA, hf_model, hf_weights


@pytest.fixture(scope="session")
def tiny_target():
    return hf_weights(hf_model(TINY_LLAMA, seed=0))


@pytest.fixture(scope="session")
def tiny_draft():
    return hf_weights(hf_model(TINY_LLAMA, seed=1))
