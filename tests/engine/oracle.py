"""HF transformers as the correctness oracle: same weights, same dtype, greedy tokens and logits."""

from __future__ import annotations

import torch

TINY_LLAMA = dict(
    architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=320, hidden_size=64, intermediate_size=160,
    num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5,
    rope_theta=10000.0, tie_word_embeddings=False, eos_token_id=2, bos_token_id=1,
    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 64},
)
TINY_QWEN2 = dict(
    architectures=["Qwen2ForCausalLM"], model_type="qwen2", vocab_size=300, hidden_size=64, intermediate_size=128,
    num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6,
    rope_theta=1000000.0, tie_word_embeddings=True, eos_token_id=3, bos_token_id=None,
)


def hf_model(hf_config: dict, seed: int = 0) -> torch.nn.Module:
    """A random-weight HF model; biases and norms randomised too so every weight path is exercised."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = AutoConfig.for_model(**hf_config)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
            elif "norm" in name:
                p.uniform_(0.5, 1.5)
            elif "embed" in name or "lm_head" in name:
                p.normal_(0, 1.0)
            else:
                p.normal_(0, 0.15)
    return model


def hf_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    sd = dict(model.state_dict())
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    return sd


@torch.inference_mode()
def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy tokens and per-step logits (fp32) from HF's own generate loop."""
    out = model.generate(
        torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False, output_logits=True,
        return_dict_in_generate=True, eos_token_id=None, pad_token_id=0,
    )
    tokens = out.sequences[0, len(prompt):].tolist()
    return tokens, [lg[0].float() for lg in out.logits]
