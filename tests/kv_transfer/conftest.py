"""Fixtures shared by the transfer tests: one harness per transport."""

from __future__ import annotations

import os

import pytest
import torch

from .harness import Harness

# Both ranks of every NCCL pair of these tests live in this one process (workers hold one rank each).
# Here, NCCL communicators must start non-blocking: started the default (blocking) way, the first
# send/recv of a fresh pair crashed the process (segfault) within 40-160 pairs in each of five runs on
# H100 and H200 (torch 2.11, NCCL 2.28), and 400 pairs in a row were clean non-blocking. With one rank
# per process the blocking start never crashed (370 pairs, two senders at once among them), so
# workers keep it. Set here, before any communicator exists (processes started from this test run
# inherit it); a value already set is kept.
os.environ.setdefault("TORCH_NCCL_USE_COMM_NONBLOCKING", "1")


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
