"""Triton kernels of the GPU fast path, one file per family, each in three parts: the
``@triton.jit`` kernel, a launcher that checks shapes/strides/dtypes/devices (never values, so no
host sync), and a plain-torch ``*_ref`` the tests compare against.

    decode_attention   paged split-KV (flash-decoding) GQA attention, one query token per sequence
    prefill_attention  paged varlen causal attention (chunked prefill, prefix hits, spec verify)
    kv_write           scatter new K/V into cache blocks by slot
    norm               RMSNorm and fused residual-add + RMSNorm
    rotary             neox-style rotary embedding on q and k, in place
    activation         SiLU-and-mul
    gemv               x [M<=4, K] @ W[N, K]^T for decode linears (read-bandwidth bound); the
                       per-shape choice between it and F.linear is engine.gemv_dispatch

CPU tensors run only under Triton's interpreter (``TRITON_INTERPRET=1``, set before import).
"""
