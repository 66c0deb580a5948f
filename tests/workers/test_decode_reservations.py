"""A decode worker's reservations end without stalling its engine loop.

The receiver's release of a reservation whose KV may still be arriving can wait (a stalled sender:
up to RELEASE_WAIT_S, then the sender is cut off). Here the receiver is a real loopback receiver whose
release is held on an event, and the engine loop is the test itself, running what ``post`` queued.
"""

from __future__ import annotations

import threading
import time

import pytest

from decode_worker.scheduler import Reservations
from engine.request import RequestStatus
from engine.sampling.params import SamplingParams
from kv_transfer.loopback import LoopbackHub, LoopbackReceiver
from tests.engine.helpers import make_engine
from tests.engine.oracle import TINY_LLAMA, hf_model, hf_weights

GREEDY = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
PROMPT = list(range(3, 14))  # 11 tokens: 3 blocks of 4


class HeldRelease(LoopbackReceiver):
    """A loopback receiver whose release waits until the test lets it go, as one waiting for bytes."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.let_go = threading.Event()
        self.released: list[str] = []

    def release(self, handle) -> None:
        self.let_go.wait(10)
        self.released.append(handle.request_id)
        super().release(handle)


@pytest.fixture(scope="module")
def weights():
    return hf_weights(hf_model(TINY_LLAMA))


@pytest.fixture
def setup(weights):
    engine = make_engine(TINY_LLAMA, weights, block_size=4, num_blocks=32, prefix=False)
    receiver = HeldRelease(LoopbackHub(), engine.runner.kv_cache, "secret")
    posted: list = []
    reservations = Reservations(engine, receiver, max_reservations=8, headroom_blocks=0, post=posted.append)
    return engine, receiver, reservations, posted


def _run_posted(posted: list, within: float = 5.0) -> None:
    """Run what was posted to the loop; waits ``within`` seconds for the first post."""
    until = time.monotonic() + within
    while not posted and time.monotonic() < until:
        time.sleep(0.005)
    assert posted, "nothing was posted to the loop"
    while posted:
        posted.pop(0)()


def test_ending_a_reservation_does_not_wait_for_the_receivers_release(setup) -> None:
    engine, receiver, reservations, posted = setup
    total = engine.kv.num_free_blocks
    res = reservations.reserve("r1", PROMPT, GREEDY, [], deadline=time.time() + 30)
    held = total - engine.kv.num_free_blocks
    assert held == 3

    start = time.monotonic()
    reservations.end("r1")  # the receiver's release is held: end() must not wait for it
    assert time.monotonic() - start < 0.5
    assert "r1" not in reservations.by_id and "r1" not in engine.requests
    assert engine.kv.num_free_blocks == total - held, "blocks freed while the release may still see writes"
    engine.abort("r1")  # the worker's abort path: must not free the blocks early either
    assert engine.kv.num_free_blocks == total - held
    engine.check_integrity()

    # The id is free again: a new reservation under it is not touched when the old one's blocks go.
    again = reservations.reserve("r1", PROMPT, GREEDY, [], deadline=time.time() + 30)
    assert posted == []
    receiver.let_go.set()
    _run_posted(posted)
    assert receiver.released == ["r1"]
    assert res.req.status is RequestStatus.ABORTED
    assert engine.requests["r1"] is again.req and again.req.status is RequestStatus.WAITING_FOR_KV
    assert engine.kv.num_free_blocks == total - held
    engine.check_integrity()
    reservations.end("r1")
    _run_posted(posted)
    assert engine.kv.num_free_blocks == total
    engine.check_integrity()


def test_expired_reservation_frees_its_blocks_after_the_release(setup) -> None:
    engine, receiver, reservations, posted = setup
    total = engine.kv.num_free_blocks
    reservations.reserve("late", PROMPT, GREEDY, [], deadline=time.time() - 1)
    start = time.monotonic()
    reservations.expire()
    assert time.monotonic() - start < 0.5
    assert "late" not in reservations.by_id and engine.kv.num_free_blocks < total
    receiver.let_go.set()
    _run_posted(posted)
    assert engine.kv.num_free_blocks == total
    engine.check_integrity()
