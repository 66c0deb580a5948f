"""One harness per transport, so the conformance suite runs the same tests against each.

A harness builds receivers and senders, and can deliver a hand-made (possibly forged) header the way
a sender would, returning the receiver's verdict.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from baton.v1 import kv_transfer_pb2, worker_pb2
from engine.kv_cache.storage import allocate_kv_cache
from kv_transfer.base import KVReceiver, KVSender, TransferError, TransferHandle
from kv_transfer.dist_receiver import DistKVReceiver
from kv_transfer.dist_sender import DistKVSender, SenderConnection
from kv_transfer.loopback import LoopbackHub, LoopbackReceiver, LoopbackSender
from kv_transfer.pair import Backend
from kv_transfer.wire import as_secret, framing_problem, message_views

SECRET = "conformance-secret"
PEER_SEED = 1  # the cache a peer process sends from is random_cache(..., seed=PEER_SEED)
REPORT_TAG = "peer-report "  # starts each line a peer process prints for the test
REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Harness:
    name: str
    src_device: torch.device
    dst_device: torch.device
    block_major: bool = False  # how the test caches are stored (engine/kv_cache/storage.py)

    def __post_init__(self) -> None:
        self.hub = LoopbackHub()
        self._closables: list = []

    @property
    def is_network(self) -> bool:
        return self.name != "loopback"

    def caches(
        self, layers: int, blocks: int, block_size: int, heads: int, head_dim: int, dtype=torch.float32, seed: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A random source cache on ``src_device`` and a zeroed destination on ``dst_device``."""
        shape = (layers, blocks, block_size, heads, head_dim)
        src = random_cache(*shape, dtype, self.src_device, seed, block_major=self.block_major)
        dst = allocate_kv_cache(*shape, dtype=dtype, device=self.dst_device, block_major=self.block_major)
        return src, dst

    def receiver(self, kv_cache: torch.Tensor, secret: str = SECRET) -> KVReceiver:
        if self.name == "loopback":
            receiver = LoopbackReceiver(self.hub, kv_cache, secret)
        else:
            # In place wherever the cache allows, gloo too: the path is then tested on CPU as well.
            receiver = DistKVReceiver(
                kv_cache, backend=self.name, secret=secret, group_timeout=20.0, receive_in_place=True
            )
        self._closables.append(receiver)
        return receiver

    def sender(self, secret: str = SECRET, **options) -> KVSender:
        if self.name == "loopback":
            sender = LoopbackSender(self.hub, secret, **options)
        else:
            sender = DistKVSender(
                backend=self.name, device=self.src_device, secret=secret, group_timeout=20.0, **options
            )
        self._closables.append(sender)
        return sender

    def deliver_header(
        self, receiver: KVReceiver, header: kv_transfer_pb2.TransferHeader
    ) -> TransferError | None:
        """Send ``header`` as an authenticated sender would; the receiver's rejection, or None if accepted."""
        if self.name == "loopback":
            try:
                receiver.table.accept_header(header, owner=object())
            except TransferError as exc:
                return exc
            return None
        backend = Backend(self.name, self.src_device)
        backend.activate()
        connection = SenderConnection.open(
            receiver.address,
            backend=backend,
            secret=as_secret(SECRET),
            sender_id="forger",
            local_host="127.0.0.1",
            deadline=time.time() + 20,
            group_timeout=20,
        )
        works = []
        try:
            connection.send_header(header, time.time() + 10)
            if framing_problem(header, 1 << 40) is None:  # a sender's messages follow its header
                payload = torch.zeros(header.payload_bytes, dtype=torch.uint8, device=self.src_device)
                works = connection.post_messages(message_views(payload, header))
            connection.read_ack(time.time() + 10)  # a refused header is answered before its bytes
        except TransferError as exc:
            return exc
        finally:
            for work in works:  # drained by the receiver; wait so closing cannot cut them off
                work.wait()
            if self.src_device.type == "cuda":
                torch.cuda.synchronize(self.src_device)
            connection.close()
        return None

    def close(self) -> None:
        for closable in reversed(self._closables):
            closable.close()


def wait_terminal(poll, handle: TransferHandle, timeout: float) -> float:
    """Poll until a terminal state; returns the seconds it took. Fails the test past ``timeout``."""
    start = time.monotonic()
    while not poll(handle).is_terminal:
        if time.monotonic() - start > timeout:
            raise AssertionError(f"transfer still {poll(handle)} after {timeout}s")
        time.sleep(0.002)
    return time.monotonic() - start


def random_cache(
    layers: int,
    blocks: int,
    block_size: int,
    heads: int,
    head_dim: int,
    dtype,
    device,
    seed: int = 0,
    block_major: bool = False,
) -> torch.Tensor:
    """A ``[layers, 2, blocks, ...]`` cache of random values, stored layer- or block-major."""
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(layers, 2, blocks, block_size, heads, head_dim, generator=generator)
    cache = allocate_kv_cache(
        layers, blocks, block_size, heads, head_dim, dtype=dtype, device=device, block_major=block_major
    )
    cache.copy_(values)
    return cache


class PeerProcess:
    """A real peer process (tests/kv_transfer/peer_process.py) that the test can kill."""

    def __init__(self, *args: str) -> None:
        env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.kv_transfer.peer_process", *args],
            cwd=REPO_ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        # Lines are read on a thread: a select() on the pipe cannot see lines already buffered.
        self._lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read_lines, daemon=True).start()

    def _read_lines(self) -> None:
        with contextlib.suppress(ValueError, OSError):  # kill() closed the pipe under us
            for line in self.process.stdout:
                self._lines.put(line)
        self._lines.put("")  # end of the stream

    def read_json(self, timeout: float = 60.0) -> dict:
        """The peer's next report; lines without ``REPORT_TAG`` (a library's output) are skipped."""
        give_up = time.monotonic() + timeout
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, give_up - time.monotonic()))
            except queue.Empty:
                self.kill()
                raise AssertionError(f"peer reported nothing in {timeout}s: {self.process.stderr.read()}") from None
            if not line:
                raise AssertionError(f"peer exited early: {self.process.wait()} {self.process.stderr.read()}")
            if line.startswith(REPORT_TAG):
                return json.loads(line[len(REPORT_TAG) :])

    def tell(self, line: str) -> None:
        """One line to the peer's standard input."""
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=10)
        self.process.stdin.close()
        self.process.stdout.close()
        self.process.stderr.close()


def target_of(payload: dict, request_id: str = "peer-request") -> TransferHandle:
    from kv_transfer.wire import handle_from_kv_target

    return handle_from_kv_target(worker_pb2.KVTarget.FromString(bytes.fromhex(payload["target"])), request_id)
