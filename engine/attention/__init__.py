"""Attention backends over the paged KV cache: one interface, a torch reference, Triton kernels."""

from engine.attention.base import AttentionBackend, AttentionMetadata, get_attention_backend

__all__ = ["AttentionBackend", "AttentionMetadata", "get_attention_backend"]
