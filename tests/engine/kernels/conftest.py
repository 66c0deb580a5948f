"""Kernel tests run natively on CUDA, or in Triton's CPU interpreter when there is no GPU.

``TRITON_INTERPRET`` is read when a kernel is decorated, so it is set here, before any test module
(and with it ``engine.kernels``) is imported. Without Triton installed the directory is skipped.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest
import torch

_HAS_CUDA = torch.cuda.is_available()
if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    _early = [
        m for m in ("engine.kernels.decode_attention", "engine.kernels.prefill_attention") if m in sys.modules
    ]
    if _early:
        raise RuntimeError(
            f"{_early} were imported before TRITON_INTERPRET=1 was set; set it in the environment "
            "(or a top-level conftest) so CPU runs use the Triton interpreter"
        )

collect_ignore_glob = [] if importlib.util.find_spec("triton") is not None else ["test_*.py"]


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if _HAS_CUDA else "cpu")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(1234)
