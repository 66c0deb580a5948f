"""Workers end transfers without stalling their engine loop.

The receiver's release of a reservation whose KV may still be arriving can wait (a stalled sender:
up to RELEASE_WAIT_S, then the sender is cut off). Here the receiver is a real loopback receiver whose
release is held on an event, and the engine loop is the test itself, running what ``post`` queued.
"""

from __future__ import annotations

import dataclasses
import threading
import time

import pytest

from decode_worker.scheduler import Reservations
from engine.request import RequestStatus
from engine.sampling.params import SamplingParams
from kv_transfer.loopback import LoopbackHub, LoopbackReceiver, LoopbackSender
from prefill_worker.scheduler import PrefillTransfers
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


class HeldSenderRelease(LoopbackSender):
    """A loopback sender whose release waits until the test lets it go, as one whose sends still read."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.let_go = threading.Event()

    def release(self, handle) -> None:
        self.let_go.wait(10)
        super().release(handle)


def test_a_prefill_that_fails_mid_transfer_releases_off_the_loop(weights) -> None:
    """The prefill side: a cancelled job whose transfer started leaves the engine at once; its blocks
    (which sends may still read) return once the sender's release returned."""
    engine = make_engine(TINY_LLAMA, weights, block_size=4, num_blocks=32, prefix=False)
    engine.hold_blocks_on_finish = True  # as a prefill worker's engine
    hub = LoopbackHub()
    decode_cache = make_engine(TINY_LLAMA, weights, block_size=4, num_blocks=32).runner.kv_cache
    receiver = LoopbackReceiver(hub, decode_cache, "secret")
    sender = HeldSenderRelease(hub, "secret")
    posted: list = []
    transfers = PrefillTransfers(engine, sender, engine.runner.kv_cache, post=posted.append)
    total = engine.kv.num_free_blocks
    handle = receiver.reserve("p1", [0, 1, 2], num_tokens=len(PROMPT), deadline=time.time() + 30)
    req = engine.add_request("p1", PROMPT, dataclasses.replace(GREEDY, max_tokens=1))
    transfers.add(req, handle, time.time() + 30)
    engine.step()  # the whole prompt in one step: its blocks are pinned for the transfer
    assert req.status is RequestStatus.SENDING_KV and engine.kv.num_free_blocks == total - 3

    start = time.monotonic()
    assert transfers.cancel("p1", "client went away")
    assert time.monotonic() - start < 0.5
    assert "p1" not in engine.requests and req.status is RequestStatus.ABORTED
    assert engine.kv.num_free_blocks == total - 3, "blocks freed while sends may still read them"
    sender.let_go.set()
    _run_posted(posted)
    assert engine.kv.num_free_blocks == total
    engine.check_integrity()
