"""Fixtures shared by the transfer tests: one harness per transport."""

from __future__ import annotations

import pytest
import torch

from .harness import Harness


def _nccl_available() -> bool:
    return (
        torch.cuda.is_available() and torch.cuda.device_count() >= 2 and torch.distributed.is_nccl_available()
    )


@pytest.fixture(
    params=[
        "loopback",
        "gloo",
        "gloo-block-major",  # caches stored block-major: pieces leave straight from the cache
        pytest.param("nccl", marks=[pytest.mark.gpu, pytest.mark.multi_gpu]),  # block-major, as the engine's
    ]
)
def transport(request) -> Harness:
    if request.param == "nccl":
        if not _nccl_available():
            pytest.skip("needs two CUDA GPUs and NCCL")
        harness = Harness("nccl", torch.device("cuda:0"), torch.device("cuda:1"), block_major=True)
    else:
        name, _, layout = request.param.partition("-")
        harness = Harness(name, torch.device("cpu"), torch.device("cpu"), block_major=layout == "block-major")
    yield harness
    harness.close()


@pytest.fixture
def gloo_transport() -> Harness:
    harness = Harness("gloo", torch.device("cpu"), torch.device("cpu"))
    yield harness
    harness.close()
