"""The transfer contract: descriptors, poll states, and the sender / receiver interfaces.

A decode worker (receiver) *reserves* destination blocks for a request and hands the returned
``TransferHandle`` to a prefill worker (sender), through the router. The sender then pushes the KV of
its own source blocks, for all layers, into those destination blocks, in one or more *pieces*, and
ends with a *done* marker. Both sides follow progress by polling::

    BOOTSTRAPPING -> TRANSFERRING -> SUCCESS
          \\               \\
           `---------------`-----> FAILED   (peer died, rejected descriptor, deadline passed)

KV cache layout (engine/attention/base.py), one tensor for all layers::

    kv_cache: [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]

(its storage may be layer-major or block-major, engine/kv_cache/storage.py). A piece is
``kv_cache[:, :, src_block_ids]`` block-major, ``[n, num_layers, 2, block_size, num_kv_heads,
head_dim]`` contiguous: moved as raw bytes in large messages of whole blocks, and scattered into
``kv_cache[:, :, dst_block_ids]`` on arrival. Transports may pipeline this a few blocks at a time
(gather the next message's blocks while earlier ones are on the wire, or send them straight from a
block-major cache; land the blocks a message completes while the next message arrives, or receive
them straight into a block-major cache once the descriptor passed).

Invariants every transport keeps:
- No byte lands in a destination block before the piece's descriptor was validated against the
  reservation (request id, handle id, block ids, layer count, dtype, shape).
- Only bytes the sender sent land; with a checksum, none land before the whole piece is verified.
  Without one, a piece that fails mid-way may leave some reserved blocks written (partly, where they
  were received in place): the reservation is then FAILED, and a FAILED reservation's blocks hold no
  valid KV (the caller frees them and never reads them as a prompt's cache).
- Blocks outside the reservation are never written.
- After ``KVReceiver.release(handle)`` returns, no further byte of that transfer is written to the cache,
  so the caller may free and reuse the blocks.
- A sender may read the source blocks after ``send`` returns (straight from the cache, on CUDA in
  stream order after the caller's work queued before ``send``). The caller keeps them unchanged and
  allocated until ``KVSender.release(handle)`` has returned; after that nothing reads them.
- Every wait has a deadline: a silent or dead peer turns into FAILED, never a hang.
"""

from __future__ import annotations

import enum
import logging
import math
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from kv_transfer.blocks import blocks_first

# How long a ``release`` waits for the transfer's operations still reading (sender) or writing
# (receiver) the caller's blocks before it cuts the link off: a live peer finishes a piece within
# milliseconds, and cutting the link also fails the other transfers on it.
RELEASE_WAIT_S = 0.5

log = logging.getLogger(__name__)


def release_then(release: Callable[[TransferHandle], None], handle: TransferHandle, then: Callable[[], None]) -> None:
    """Run ``release(handle)`` on a thread of its own, then ``then()`` (also when the release raised).

    For a caller that must not wait, such as an engine loop: the release of a transfer still moving
    bytes waits for them (up to RELEASE_WAIT_S), then cuts the peer off. ``then`` hands the blocks
    back, which is safe only once the release returned.
    """

    def run() -> None:
        try:
            release(handle)
        except Exception:  # a release is not meant to fail; the blocks go back all the same
            log.exception("releasing KV transfer %s failed", handle.handle_id)
        finally:
            then()

    threading.Thread(target=run, name="kv-release", daemon=True).start()

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float8_e4m3fn": torch.float8_e4m3fn,
    "float8_e5m2": torch.float8_e5m2,
}


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``: the wire name of a cache dtype."""
    for name, candidate in DTYPES.items():
        if candidate == dtype:
            return name
    raise ValueError(f"unsupported KV cache dtype {dtype}; expected one of {sorted(DTYPES)}")


class TransferState(enum.Enum):
    BOOTSTRAPPING = "bootstrapping"  # reserved / queued; no piece accepted yet
    TRANSFERRING = "transferring"  # at least one piece accepted, done marker not yet acknowledged
    SUCCESS = "success"  # every reserved block landed and the done marker was acknowledged
    FAILED = "failed"  # terminal; ``error(handle)`` says why

    @property
    def is_terminal(self) -> bool:
        return self in (TransferState.SUCCESS, TransferState.FAILED)


class TransferError(RuntimeError):
    """A transfer could not proceed; ``code`` is a ``baton.v1.ErrorCode`` name such as ``"NOT_FOUND"``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True)
class KVLayout:
    """Shape of a paged KV cache; two workers exchange blocks only when their layouts are equal."""

    num_layers: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: str  # wire name, see DTYPES

    def __post_init__(self) -> None:
        for field in ("num_layers", "block_size", "num_kv_heads", "head_dim"):
            if getattr(self, field) <= 0:
                raise ValueError(f"KVLayout.{field} must be positive, got {getattr(self, field)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"KVLayout.dtype {self.dtype!r} is not one of {sorted(DTYPES)}")

    @classmethod
    def of(cls, kv_cache: torch.Tensor) -> KVLayout:
        """The layout of a ``[num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]`` cache."""
        if kv_cache.dim() != 6 or kv_cache.shape[1] != 2:
            raise ValueError(
                "kv_cache must be [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim], "
                f"got shape {tuple(kv_cache.shape)}"
            )
        num_layers, _, _, block_size, num_kv_heads, head_dim = kv_cache.shape
        return cls(num_layers, block_size, num_kv_heads, head_dim, dtype_name(kv_cache.dtype))

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def piece_shape(self, num_blocks: int) -> tuple[int, ...]:
        """Shape of the contiguous (block-major) tensor holding ``num_blocks`` blocks of every layer."""
        return (num_blocks, self.num_layers, 2, self.block_size, self.num_kv_heads, self.head_dim)

    @property
    def block_bytes(self) -> int:
        """Bytes of one block across all layers, K and V."""
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim * self.element_size

    @property
    def element_size(self) -> int:
        return self.torch_dtype.itemsize

    def num_blocks_for(self, num_tokens: int) -> int:
        return math.ceil(num_tokens / self.block_size)


@dataclass(frozen=True)
class TransferHandle:
    """Everything a sender needs to push KV into one reservation (mirrors ``baton.v1.KVTarget``).

    Prompt block ``i`` goes to ``block_ids[i - first_block_index]``; blocks before
    ``first_block_index`` are already cached at the receiver and are never sent.
    """

    request_id: str
    handle_id: str
    receiver_id: str
    address: str  # "host:port" of the receiver's rendezvous ("loopback:<name>" in-process)
    block_ids: tuple[int, ...]
    num_tokens: int
    layout: KVLayout
    deadline: float  # absolute, seconds since the epoch (time.time())
    first_block_index: int = 0

    def remaining(self, now: float | None = None) -> float:
        """Seconds left before the deadline (negative once it passed)."""
        return self.deadline - (time.time() if now is None else now)


class KVSender(ABC):
    """Pushes KV blocks into reservations made by remote receivers."""

    @abstractmethod
    def send(
        self,
        handle: TransferHandle,
        src_block_ids: Sequence[int],
        kv_cache: torch.Tensor,
        *,
        dst_block_offset: int = 0,
        last: bool = True,
    ) -> None:
        """Queue one piece: source blocks ``src_block_ids`` -> ``handle.block_ids[dst_block_offset:][:n]``.

        With ``last`` the done marker follows the piece; ``src_block_ids`` may then be empty (a bare
        done marker). Returns once the piece is queued; the source blocks may be read until
        ``release(handle)`` returned, so keep them as they are till then. Raises ``ValueError``
        for arguments that cannot be right (ids out of range, layout mismatch, piece after ``last``).
        """

    @abstractmethod
    def poll(self, handle: TransferHandle) -> TransferState:
        """Current state; SUCCESS only after the receiver acknowledged the done marker."""

    def warm_up(self, address: str) -> bool:
        """Start opening the link to the receiver at ``address`` ("host:port") in the background, so
        the first transfer to it does not pay for the setup. True if this call started it; False if
        the link is open or opening already, or the transport has nothing to open. Never raises for an
        unreachable receiver: the first transfer then tries again (and fails as it would have)."""
        return False

    @abstractmethod
    def error(self, handle: TransferHandle) -> str | None:
        """Why the transfer FAILED, else None."""

    @abstractmethod
    def release(self, handle: TransferHandle) -> None:
        """Forget a transfer (after SUCCESS or FAILED, or to give up on it).

        Once it returns, nothing reads the transfer's source blocks any more: it waits (briefly) for
        sends still reading them, and cuts the link off if they do not finish.
        """

    @abstractmethod
    def close(self) -> None:
        """Tear down every connection; pending transfers become FAILED."""


class KVReceiver(ABC):
    """Owns a KV cache and accepts pieces into blocks reserved for them."""

    @property
    @abstractmethod
    def address(self) -> str:
        """Where senders reach this receiver ("host:port")."""

    @abstractmethod
    def reserve(
        self,
        request_id: str,
        block_ids_dst: Sequence[int],
        num_tokens: int,
        deadline: float,
        *,
        first_block_index: int = 0,
    ) -> TransferHandle:
        """Accept KV for ``block_ids_dst`` until ``deadline`` (absolute epoch seconds).

        ``len(block_ids_dst)`` must equal ``ceil(num_tokens / block_size) - first_block_index``.
        The caller owns the blocks (allocated them) and frees them after ``release``.
        """

    @abstractmethod
    def poll(self, handle: TransferHandle) -> TransferState:
        """Current state; SUCCESS means every reserved block holds the sender's bytes."""

    @abstractmethod
    def wait(self, handle: TransferHandle, timeout: float) -> TransferState:
        """Block until the transfer is terminal or ``timeout`` seconds passed; the state then.

        Wakes as soon as the state changes (no polling interval added to the caller's latency)."""

    @abstractmethod
    def error(self, handle: TransferHandle) -> str | None:
        """Why the transfer FAILED, else None."""

    @abstractmethod
    def release(self, handle: TransferHandle) -> None:
        """Drop the reservation; afterwards nothing more is written into its blocks."""

    @abstractmethod
    def close(self) -> None:
        """Stop accepting transfers and tear down every connection."""


def check_block_ids(block_ids: Sequence[int], num_blocks: int, what: str) -> tuple[int, ...]:
    """Validate ids against a cache of ``num_blocks`` blocks: in range and distinct."""
    ids = tuple(int(b) for b in block_ids)
    bad = [b for b in ids if not 0 <= b < num_blocks]
    if bad:
        raise ValueError(f"{what}: block ids {bad[:8]} out of range [0, {num_blocks})")
    if len(set(ids)) != len(ids):
        raise ValueError(f"{what}: block ids must be distinct, got {list(ids)[:16]}")
    return ids


def gather_blocks(kv_cache: torch.Tensor, block_ids: Sequence[int]) -> torch.Tensor:
    """One contiguous block-major ``[n, num_layers, 2, block_size, heads, head_dim]`` copy of the blocks."""
    index = torch.tensor(list(block_ids), dtype=torch.long, device=kv_cache.device)
    return blocks_first(kv_cache).index_select(0, index).contiguous()


def scatter_blocks(kv_cache: torch.Tensor, block_ids: Sequence[int], piece: torch.Tensor) -> None:
    """Write a block-major piece into ``kv_cache[:, :, block_ids]`` (in place)."""
    index = torch.tensor(list(block_ids), dtype=torch.long, device=kv_cache.device)
    blocks_first(kv_cache).index_copy_(0, index, piece)


def check_piece(
    handle: TransferHandle, src_block_ids: Sequence[int], kv_cache: torch.Tensor, dst_block_offset: int
) -> tuple[int, ...]:
    """Sender-side argument checks shared by every transport."""
    layout = KVLayout.of(kv_cache)
    if layout != handle.layout:
        raise ValueError(f"local cache layout {layout} differs from the receiver's {handle.layout}")
    src = check_block_ids(src_block_ids, kv_cache.shape[2], "send")
    if dst_block_offset < 0 or dst_block_offset + len(src) > len(handle.block_ids):
        raise ValueError(
            f"blocks [{dst_block_offset}, {dst_block_offset + len(src)}) exceed the {len(handle.block_ids)} reserved"
        )
    return src
