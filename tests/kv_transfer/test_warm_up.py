"""``KVSender.warm_up``: the link to a receiver opens before the first transfer needs it."""

from __future__ import annotations

import time

import pytest
import torch

from kv_transfer.base import TransferState
from kv_transfer.dist_receiver import DistKVReceiver
from kv_transfer.dist_sender import DistKVSender

from .harness import random_cache, wait_terminal


def _wait_open(sender: DistKVSender, address: str, timeout: float = 20.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        link = sender._links.get(address)
        if link is not None and link.connection is not None:
            return True
        time.sleep(0.01)
    return False


def test_a_warmed_link_sends_the_first_piece_directly(monkeypatch) -> None:
    src = random_cache(2, 16, 4, 2, 8, torch.float32, "cpu")
    dst = torch.zeros_like(src)
    receiver = DistKVReceiver(dst, backend="gloo", secret="s", group_timeout=20.0)
    sender = DistKVSender(backend="gloo", device="cpu", secret="s", group_timeout=20.0)
    try:
        assert sender.warm_up(receiver.address) is True
        assert sender.warm_up(receiver.address) is False, "opening already"
        assert _wait_open(sender, receiver.address), "the link did not open"
        assert sender.warm_up(receiver.address) is False, "open already"

        def queued(job, kv_cache):  # the path a first piece to an unopened link takes
            raise AssertionError("the first piece was queued behind the link's setup")

        monkeypatch.setattr(sender, "gather", queued)
        handle = receiver.reserve("r", [3, 4], 8, time.time() + 30)
        sender.send(handle, [7, 8], src)
        wait_terminal(sender.poll, handle, 30)
        assert sender.poll(handle) is TransferState.SUCCESS, sender.error(handle)
        assert torch.equal(dst[:, :, [3, 4]], src[:, :, [7, 8]])
    finally:
        sender.close()
        receiver.close()


def test_warm_up_of_an_unreachable_receiver_costs_the_first_transfer_nothing_new() -> None:
    sender = DistKVSender(backend="gloo", device="cpu", secret="s", group_timeout=2.0)
    try:
        with pytest.raises(ValueError, match="host:port"):
            sender.warm_up("no-port-here")
        assert sender.warm_up("127.0.0.1:9") is True  # nothing listens there: logged, not raised
        end = time.monotonic() + 10
        while sender._links["127.0.0.1:9"]._open_wanted and time.monotonic() < end:
            time.sleep(0.01)
        link = sender._links["127.0.0.1:9"]
        assert not link._open_wanted and link.connection is None
        assert sender.warm_up("127.0.0.1:9") is True, "a failed attempt may be asked for again"
    finally:
        sender.close()
