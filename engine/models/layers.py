"""Building blocks shared by the Llama-family models: RMSNorm, rotary embedding, gated MLP, and the
two interchangeable implementations of the model's pointwise ops.

``TorchOps`` is plain torch (the CPU path and the reference); ``TritonOps`` runs the fused Triton
kernels of ``engine.kernels`` (same math, reductions in fp32). A model holds exactly one of them,
chosen once when the engine is built (``LlamaForCausalLM.use_triton_ops``), and passes it down
explicitly: no per-call device checks.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 and cast back before the weight, exactly as HF Llama does. On CPU,
        # torch's rms_norm without a weight is that first part (fp32 math, one rounding to x's
        # dtype) in one op instead of six, with bit-identical results (tests/engine/test_cpu_fast_paths.py).
        if x.is_cpu:
            return self.weight * nn.functional.rms_norm(x, (x.shape[-1],), eps=self.eps)
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    """Inverse frequencies [head_dim/2], including Llama 3.1 ("llama3") and linear rope scaling."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling is None:
        return inv_freq
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "linear":
        return inv_freq / float(scaling["factor"])
    if kind == "llama3":
        factor = float(scaling["factor"])
        low_freq_factor = float(scaling.get("low_freq_factor", 1.0))
        high_freq_factor = float(scaling.get("high_freq_factor", 4.0))
        old_ctx = float(scaling.get("original_max_position_embeddings", 8192))
        low_freq_wavelen = old_ctx / low_freq_factor
        high_freq_wavelen = old_ctx / high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        # Long wavelengths are scaled down by `factor`, short ones kept, the band between interpolated.
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
        return torch.where(is_medium, smoothed, scaled)
    raise ValueError(f"unsupported rope scaling type {kind!r} (supported: linear, llama3)")


class RotaryEmbedding(nn.Module):
    """Neox-style (rotate-half) rotary embedding with a precomputed cos/sin table."""

    def __init__(
        self, head_dim: int, max_positions: int, theta: float, scaling: dict[str, Any] | None
    ) -> None:
        super().__init__()
        self.head_dim, self.max_positions, self.theta, self.scaling = head_dim, max_positions, theta, scaling
        inv_freq = rope_inv_freq(head_dim, theta, scaling)
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.int64).float(), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)  # [P, D]
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # q: [T, Hq, D], k: [T, Hkv, D], positions: [T]
        cos, sin = self.tables(positions, q.dtype)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)

    def tables(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``cos, sin`` of ``positions`` as ``[T, 1, D]`` in ``dtype``, for ``apply_rotary``; the
        sin's first half is negated (``rotate_half(x) * sin == roll(x, D/2) * signed_sin``)."""
        cos = self.cos[positions].unsqueeze(1).to(dtype)  # [T, 1, D]
        sin = (self.sin[positions] * self._half_signs()).unsqueeze(1).to(dtype)
        return cos, sin

    def _half_signs(self) -> torch.Tensor:
        half = self.head_dim // 2
        signs = torch.ones(self.head_dim, device=self.sin.device, dtype=self.sin.dtype)
        signs[:half] = -1
        return signs

    def half_tables_fp32(self, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
        """``cos, sin [max_positions, head_dim/2]`` in fp32, computed on ``device``.

        The same frequencies (rope scaling included) as the module's own table, but never rounded
        to the model dtype: ``model.to(bf16)`` casts the registered buffers, these stay fp32.
        """
        inv_freq = rope_inv_freq(self.head_dim, self.theta, self.scaling).to(device)
        positions = torch.arange(self.max_positions, dtype=torch.int64, device=device).float()
        freqs = torch.outer(positions, inv_freq)  # one fp32 multiply per entry, as HF computes it
        return freqs.cos(), freqs.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin`` (rotate_half(x) = cat(-x2, x1)), written as a roll times
    the half-negated sin of ``RotaryEmbedding.tables``: bit-identical (negation is exact), fewer ops."""
    return x * cos + torch.roll(x, x.shape[-1] // 2, dims=-1) * signed_sin


def _adjacent_heads(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor | None:
    """``[T, Hq + Hkv, D]`` view over q's heads then k's, when k's heads follow q's in memory with
    the same strides (q and k are views of one fused qkv projection output); else None."""
    t, hq, d = q.shape
    if (
        q.stride() != k.stride()
        or q.stride(2) != 1
        or q.stride(1) != d
        or q.stride(0) < (hq + k.shape[1]) * d
        or k.data_ptr() != q.data_ptr() + hq * d * q.element_size()
    ):
        return None
    return q.as_strided((t, hq + k.shape[1], d), q.stride())


class GatedMLP(nn.Module):
    """down(silu(gate(x)) * up(x)) with gate and up fused into one matmul."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(hidden_size, 2 * intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.intermediate_size = intermediate_size

    def forward(self, x: torch.Tensor, ops: TorchOps | TritonOps) -> torch.Tensor:
        return self.down_proj(ops.silu_and_mul(self.gate_up_proj(x)))


class TorchOps:
    """Plain torch: the CPU path, and the reference the fused kernels are checked against.

    ``add_rms_norm`` returns a new residual tensor (``residual + x``), exactly the ops an unfused
    model runs, so results are bit-for-bit those of ``x = x + sublayer(norm(x))``.
    """

    name = "torch"

    def __init__(self) -> None:
        # Rotary tables depend only on the step's positions: gathered on the first layer, reused by
        # the others. Keyed by the positions tensor itself (one per step; held, so never recycled).
        self._rope_key: tuple[torch.Tensor, torch.dtype, RotaryEmbedding] | None = None
        self._rope_tables: tuple[torch.Tensor, torch.Tensor] | None = None

    def rms_norm(self, x: torch.Tensor, norm: RMSNorm) -> torch.Tensor:
        return norm(x)

    def add_rms_norm(
        self, x: torch.Tensor, residual: torch.Tensor, norm: RMSNorm
    ) -> tuple[torch.Tensor, torch.Tensor]:
        residual = residual + x
        return norm(residual), residual

    def rotary(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, rope: RotaryEmbedding
    ) -> tuple[torch.Tensor, torch.Tensor]:
        key = self._rope_key
        if key is None or key[0] is not positions or key[1] != q.dtype or key[2] is not rope:
            self._rope_key, self._rope_tables = (positions, q.dtype, rope), rope.tables(positions, q.dtype)
        cos, sin = self._rope_tables
        qk = _adjacent_heads(q, k)
        if qk is not None:  # one rotation over q's and k's heads together: half the ops
            rotated = apply_rotary(qk, cos, sin)
            return rotated[:, : q.shape[1]], rotated[:, q.shape[1] :]
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)

    def rotary_and_write_kv(
        self,
        positions: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        rope: RotaryEmbedding,
        attn,
        kv_layer: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> torch.Tensor:
        """Rotary on q and k, then k and v into the cache through the attention backend; returns q."""
        q, k = self.rotary(positions, q, k, rope)
        attn.write_kv(k, v, kv_layer, slot_mapping)
        return q

    def silu_and_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return nn.functional.silu(gate) * up


class TritonOps:
    """The fused Triton kernels: RMSNorm with the residual add folded in (residual updated in
    place), rotary in place on the q view of the fused qkv output with the rotated keys and the
    values written straight into the KV cache (one kernel), SiLU-and-mul in one pass.

    Holds the fp32 rotary tables (``[max_positions, D/2]``) built from the model's own
    ``RotaryEmbedding``, so rope scaling is applied exactly and never rounded to bf16.
    Every launch depends only on shapes (no host sync), so a step is CUDA-graph capturable.
    """

    name = "triton"

    def __init__(self, rope: RotaryEmbedding, device: torch.device) -> None:
        from engine.kernels.activation import silu_and_mul
        from engine.kernels.norm import fused_add_rms_norm, rms_norm
        from engine.kernels.rotary import apply_rotary
        from engine.kernels.rotary_kv_write import rotary_kv_write

        self._rms_norm, self._fused_add_rms_norm = rms_norm, fused_add_rms_norm
        self._apply_rotary, self._silu_and_mul = apply_rotary, silu_and_mul
        self._rotary_kv_write = rotary_kv_write
        self.cos, self.sin = rope.half_tables_fp32(device)

    def rms_norm(self, x: torch.Tensor, norm: RMSNorm) -> torch.Tensor:
        return self._rms_norm(x, norm.weight, norm.eps)

    def add_rms_norm(
        self, x: torch.Tensor, residual: torch.Tensor, norm: RMSNorm
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self._fused_add_rms_norm(x, residual, norm.weight, norm.eps), residual

    def rotary(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, rope: RotaryEmbedding
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self._apply_rotary(q, k, positions, self.cos, self.sin)
        return q, k

    def rotary_and_write_kv(
        self,
        positions: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        rope: RotaryEmbedding,
        attn,
        kv_layer: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> torch.Tensor:
        """One kernel: q rotated in place, rotated k and v written into ``kv_layer`` (the Triton
        backend's cache layout, the only backend these ops run with); returns q. ``k`` is left
        unrotated: attention reads keys from the cache only."""
        self._rotary_kv_write(q, k, v, positions, self.cos, self.sin, kv_layer, slot_mapping)
        return q

    def silu_and_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        return self._silu_and_mul(gate_up)
