"""KV transfer over NCCL: GPU to GPU (NVLink / PCIe / network), no host copies of the KV bytes."""

from __future__ import annotations

import torch

from kv_transfer.dist_receiver import DistKVReceiver
from kv_transfer.dist_sender import DistKVSender


class NcclKVSender(DistKVSender):
    def __init__(self, *, device: torch.device | str, secret: bytes | str, **kwargs) -> None:
        super().__init__(backend="nccl", device=device, secret=secret, **kwargs)


class NcclKVReceiver(DistKVReceiver):
    def __init__(self, kv_cache: torch.Tensor, *, secret: bytes | str, **kwargs) -> None:
        super().__init__(kv_cache, backend="nccl", secret=secret, **kwargs)
