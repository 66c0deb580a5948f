"""Mistral: the Llama architecture (GQA, no biases). Sliding-window attention is not applied: the
models we serve use a window at least as long as the context (``max_model_len`` is capped to it)."""

from engine.models.llama import LlamaForCausalLM


class MistralForCausalLM(LlamaForCausalLM):
    pass
