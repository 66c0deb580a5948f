"""KV transfer over gloo: CPU tensors, TCP between processes. For CPU workers and tests."""

from __future__ import annotations

import torch

from kv_transfer.dist_receiver import DistKVReceiver
from kv_transfer.dist_sender import DistKVSender


class GlooKVSender(DistKVSender):
    def __init__(self, *, secret: bytes | str, **kwargs) -> None:
        super().__init__(backend="gloo", device=torch.device("cpu"), secret=secret, **kwargs)


class GlooKVReceiver(DistKVReceiver):
    def __init__(self, kv_cache: torch.Tensor, *, secret: bytes | str, **kwargs) -> None:
        if kv_cache.device.type != "cpu":
            raise ValueError(f"the gloo transport moves CPU caches, got {kv_cache.device}")
        super().__init__(kv_cache, backend="gloo", secret=secret, **kwargs)
