"""Standalone 2-rank process groups, one per sender-receiver pair, and deadline-bounded waits on them.

Why standalone groups: a worker talks to many peers that come and go; the global default group of
``torch.distributed`` is one fixed world. Each pair instead builds its own ``ProcessGroupGloo`` or
``ProcessGroupNCCL`` on the receiver's ``TCPStore`` under an unguessable key prefix (agreed over the
authenticated control channel), and throws it away when the peer fails or leaves.

Ranks: the sender is rank 0, the receiver rank 1.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from kv_transfer.wire import PeerGone, peer_closed

SENDER_RANK = 0
RECEIVER_RANK = 1
BACKENDS = ("gloo", "nccl")

# By default ProcessGroupNCCL tears the whole process down when an operation fails or times out. A
# dead prefill worker must not take the decode worker with it: we watch every operation with our own
# deadline and abort the pair's group ourselves. The group's constructor reads this variable. It is
# set here, once, as the module is imported (before a worker starts its threads), and never changed
# later: changing the environment while other threads read it (NCCL reads many variables as each
# communicator starts) can crash the process. A value the user chose is kept.
os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "0")


@dataclass(frozen=True)
class Backend:
    """Which ``torch.distributed`` backend moves the bytes, and where the KV cache lives."""

    name: str  # "gloo" | "nccl"
    device: torch.device

    def __post_init__(self) -> None:
        if self.name not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.name!r}")
        if self.name == "nccl" and self.device.type != "cuda":
            raise ValueError(f"the nccl backend needs a cuda device, got {self.device}")

    def activate(self) -> None:
        """Make this thread's current CUDA device the cache's (NCCL ops run on the current device)."""
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)


def parse_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"expected host:port, got {address!r}")
    return host.strip("[]"), int(port)


def make_group(
    backend: Backend,
    store: dist.Store,
    prefix: str,
    rank: int,
    local_host: str,
    timeout: float,
) -> dist.ProcessGroup:
    """Build this side of a pair's group; blocks (gloo) until the other side joins or ``timeout``."""
    pair_store = dist.PrefixStore(prefix, store)
    delta = datetime.timedelta(seconds=max(timeout, 1.0))
    if backend.name == "gloo":
        options = dist.ProcessGroupGloo._Options()
        options._devices = [dist.ProcessGroupGloo.create_device(hostname=local_host)]
        options._timeout = delta
        return dist.ProcessGroupGloo(pair_store, rank, 2, options)
    # High priority: the transfer's few NCCL blocks start ahead of the gather/scatter copies and of
    # the model's kernels queued beside them, so the link never idles waiting for free SMs.
    options = dist.ProcessGroupNCCL.Options()
    options.is_high_priority_stream = True
    options._timeout = delta
    return dist.ProcessGroupNCCL(pair_store, rank, 2, options)


def teardown_group(group: dist.ProcessGroup | None) -> None:
    """Abort a pair's group; pending operations fail instead of waiting for the peer."""
    if group is None:
        return
    for method in ("abort", "shutdown"):
        fn = getattr(group, method, None)
        if fn is not None:
            with contextlib.suppress(Exception):
                fn()
            return


SPIN_S = 0.002  # wait_works polls without sleeping this long...
BACKOFF_S = 0.0002  # ...then sleeps this long between polls


def wait_works(
    works: Sequence[dist.Work], backend: Backend, deadline: float, control: socket.socket | None
) -> None:
    """Wait for point-to-point operations, bounded by ``deadline`` and by the peer's liveness.

    The peer's control socket must stay silent while data moves; EOF on it means the peer died, so
    we fail at once rather than at the deadline. Raises TimeoutError, PeerGone or RuntimeError.

    Gloo work reports completion only from ``wait``, which honours a timeout and fails by itself when
    the peer's connection drops; NCCL work completes on the GPU, so it is polled.
    """
    if not works:
        return
    if backend.name == "gloo":
        for work in works:
            remaining = deadline - time.time()
            if remaining <= 0:
                raise TimeoutError("deadline exceeded while KV bytes were in flight")
            try:
                work.wait(datetime.timedelta(seconds=remaining))
            except RuntimeError as exc:
                if "Timed out" in str(exc) or time.time() >= deadline:
                    raise TimeoutError(f"deadline exceeded while KV bytes were in flight: {exc}") from exc
                raise
        return
    start = time.monotonic()
    next_liveness_check = start
    while not all(work.is_completed() for work in works):
        now = time.monotonic()
        if time.time() > deadline:
            raise TimeoutError("deadline exceeded while KV bytes were in flight")
        if control is not None and now >= next_liveness_check:
            if peer_closed(control):
                raise PeerGone("peer closed the control connection while KV bytes were in flight")
            next_liveness_check = now + 0.005
        # Spin while a large transfer would still be moving (256 MiB take ~0.8 ms over NVLink), then
        # back off. A coarse backoff is paid in full by every transfer that outlasts the spin (a
        # 0.5 ms sleep ends ~0.6 ms later), a fine one costs GIL hand-offs: polls in between.
        time.sleep(0 if now - start < SPIN_S else BACKOFF_S)
    for work in works:
        work.wait()  # raises the operation's error; on CUDA orders the current stream after it


def exchange_probe(
    group: dist.ProcessGroup, backend: Backend, rank: int, deadline: float, control: socket.socket
) -> None:
    """One tiny message from sender to receiver: proves the pair works (and builds NCCL's communicator)."""
    probe = torch.ones(1, dtype=torch.uint8, device=backend.device)
    if rank == SENDER_RANK:
        work = group.send([probe], RECEIVER_RANK, 0)
    else:
        probe.zero_()
        work = group.recv([probe], SENDER_RANK, 0)
    wait_works([work], backend, deadline, control)
    if rank == RECEIVER_RANK and int(probe.item()) != 1:
        raise RuntimeError("pair probe carried the wrong byte")
