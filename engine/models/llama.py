"""Llama family (Llama 2/3/3.1, SmolLM2; Mistral and Qwen2 subclass it).

Shapes in comments: T = tokens in the step (flattened over sequences), H = hidden size,
Hq / Hkv = query / key-value heads, D = head dim, V = vocab, L = layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from engine.attention.base import AttentionBackend, AttentionMetadata
from engine.config import ModelConfig
from engine.models.layers import GatedMLP, RMSNorm, RotaryEmbedding, TorchOps, TritonOps


@dataclass(frozen=True)
class ForwardContext:
    """What every layer of one forward shares: the step's metadata and the chosen implementations."""

    meta: AttentionMetadata
    attn: AttentionBackend
    ops: TorchOps | TritonOps
    rope: RotaryEmbedding


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, qkv_bias: bool) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=qkv_bias)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=False)
        self.scale = cfg.head_dim**-0.5

    def forward(
        self,
        x: torch.Tensor,  # [T, H]
        positions: torch.Tensor,  # [T]
        ctx: ForwardContext,
        kv_layer: torch.Tensor,  # [2, num_blocks, block_size, Hkv, D]
    ) -> torch.Tensor:
        t = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(t, self.num_heads, self.head_dim)  # [T, Hq, D] (views into the qkv output)
        k = k.view(t, self.num_kv_heads, self.head_dim)  # [T, Hkv, D]
        v = v.view(t, self.num_kv_heads, self.head_dim)
        q = ctx.ops.rotary_and_write_kv(positions, q, k, v, ctx.rope, ctx.attn, kv_layer, ctx.meta.slot_mapping)
        o = ctx.attn.attend(q, kv_layer, ctx.meta, self.scale)  # [T, Hq, D]
        return self.o_proj(o.reshape(t, self.q_size))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, qkv_bias: bool) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(cfg, qkv_bias)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(
        self,
        h: torch.Tensor,  # [T, H] this layer's input, already normalised by input_layernorm
        residual: torch.Tensor,  # [T, H] the residual stream before this layer
        positions: torch.Tensor,
        ctx: ForwardContext,
        kv_layer: torch.Tensor,
        next_norm: RMSNorm,  # the next layer's input_layernorm, or the final norm
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(next_norm(residual'), residual')`` with ``residual' = residual + attn + mlp``.

        Each residual add is fused with the norm that follows it; with ``TritonOps`` the residual
        tensor is updated in place."""
        a = self.self_attn(h, positions, ctx, kv_layer)
        h, residual = ctx.ops.add_rms_norm(a, residual, self.post_attention_layernorm)
        m = self.mlp(h, ctx.ops)
        return ctx.ops.add_rms_norm(m, residual, next_norm)


class LlamaForCausalLM(nn.Module):
    """Decoder over a paged KV cache. ``forward`` returns hidden states; ``compute_logits`` the logits
    of selected rows only (the last token of each sequence, or every verified position).

    Pointwise ops run through ``self.ops``: ``TorchOps`` unless ``use_triton_ops()`` switched the
    model to the fused kernels (done once, when a CUDA engine with Triton attention is built)."""

    qkv_bias = False

    def __init__(self, cfg: ModelConfig, max_positions: int | None = None) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg, self.qkv_bias) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rope = RotaryEmbedding(
            cfg.head_dim, max_positions or cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling_dict
        )
        self.ops: TorchOps | TritonOps = TorchOps()

    def use_triton_ops(self) -> None:
        """Switch to the fused Triton kernels (CUDA). Call after the weights and ``rope`` are final."""
        self.ops = TritonOps(self.rope, self.embed_tokens.weight.device)

    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        positions: torch.Tensor,  # [T]
        kv_cache: torch.Tensor,  # [L, 2, num_blocks, block_size, Hkv, D]
        meta: AttentionMetadata,
        attn: AttentionBackend,
    ) -> torch.Tensor:  # [T, H]
        ctx = ForwardContext(meta, attn, self.ops, self.rope)
        residual = self.embed_tokens(input_ids)
        h = self.ops.rms_norm(residual, self.layers[0].input_layernorm)
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            next_norm = self.norm if i == last else self.layers[i + 1].input_layernorm
            h, residual = layer(h, residual, positions, ctx, kv_cache[i], next_norm)
        return h

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [N, H] -> [N, V] fp32
        return self.lm_head(hidden).float()

    # --- weights -------------------------------------------------------------------------------
    def load_hf_weights(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy HF-named tensors in, fusing q/k/v and gate/up. Every parameter must be covered."""
        own = dict(self.named_parameters())
        loaded: set[str] = set()

        def put(name: str, value: torch.Tensor) -> None:
            param = own[name]
            if param.shape != value.shape:
                raise ValueError(
                    f"weight {name}: expected shape {tuple(param.shape)}, got {tuple(value.shape)}"
                )
            with torch.no_grad():
                param.copy_(value)
            loaded.add(name)

        for i in range(self.config.num_layers):
            p = f"model.layers.{i}."
            attn = f"layers.{i}.self_attn."
            put(
                attn + "qkv_proj.weight",
                torch.cat([tensors[p + f"self_attn.{n}_proj.weight"] for n in "qkv"]),
            )
            if self.qkv_bias:
                put(
                    attn + "qkv_proj.bias",
                    torch.cat([tensors[p + f"self_attn.{n}_proj.bias"] for n in "qkv"]),
                )
            put(attn + "o_proj.weight", tensors[p + "self_attn.o_proj.weight"])
            mlp = f"layers.{i}.mlp."
            put(
                mlp + "gate_up_proj.weight",
                torch.cat([tensors[p + "mlp.gate_proj.weight"], tensors[p + "mlp.up_proj.weight"]]),
            )
            put(mlp + "down_proj.weight", tensors[p + "mlp.down_proj.weight"])
            put(f"layers.{i}.input_layernorm.weight", tensors[p + "input_layernorm.weight"])
            put(f"layers.{i}.post_attention_layernorm.weight", tensors[p + "post_attention_layernorm.weight"])
        put("embed_tokens.weight", tensors["model.embed_tokens.weight"])
        put("norm.weight", tensors["model.norm.weight"])
        if not self.config.tie_word_embeddings:
            put("lm_head.weight", tensors["lm_head.weight"])
        missing = set(own) - loaded - ({"lm_head.weight"} if self.config.tie_word_embeddings else set())
        if missing:
            raise ValueError(f"weights missing for parameters: {sorted(missing)[:8]}")
