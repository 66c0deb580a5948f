"""Moving KV blocks between workers: ``KVSender`` / ``KVReceiver`` over loopback, gloo or nccl.

Map: ``base`` (contract, descriptors, poll states) · ``wire`` (control framing, HMAC handshake,
headers) · ``blocks`` (block-range copies between a cache and a block-major piece, or none: messages
straight from a block-major cache) · ``staging`` (reusable piece
buffers, their views, the send / land schedules) · ``reservations`` (receiver bookkeeping and
descriptor checks, shared by all transports) · ``pair`` (standalone 2-rank process groups,
deadline-bounded waits) · ``dist_sender`` / ``sender_link`` / ``dist_receiver`` (the torch.distributed
transport) · ``gloo`` / ``nccl`` / ``loopback`` (entry points) · ``call_count`` (counting calls into
torch on the host path, for the benchmark and tests).
"""

from kv_transfer.base import (
    KVLayout,
    KVReceiver,
    KVSender,
    TransferError,
    TransferHandle,
    TransferState,
)

__all__ = ["KVLayout", "KVReceiver", "KVSender", "TransferError", "TransferHandle", "TransferState"]
