"""GGUF loading: write small GGUF files the way llama.cpp's converter does, read them back.

The writer side re-implements the converter's Q/K row permutation from its published formula, so a
loader that forgets to undo it (or undoes it wrongly) gives back different tensors than we wrote.
K-quant blocks are packed here from the GGML block layouts, with the expected dequantized values
computed from the integer codes, so dequantization is checked against an independent reference.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as Q  # noqa: E402
from gguf.quants import quantize  # noqa: E402

from engine.config import ModelConfig  # noqa: E402
from engine.weights import dummy_weights  # noqa: E402
from engine.weights.gguf_config import llama3_rope_divisors  # noqa: E402
from engine.weights.gguf_loader import load_gguf  # noqa: E402

TINY_LLAMA = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 96, "hidden_size": 64,
    "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "head_dim": 16, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "rope_scaling": None,
    "max_position_embeddings": 512, "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
}  # fmt: skip
TINY_QWEN2 = TINY_LLAMA | {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "tie_word_embeddings": True,
    "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
}  # fmt: skip
# Rows of 256 values so K-quant super-blocks fit every 2-D tensor.
K_QUANT_LLAMA = TINY_LLAMA | {
    "vocab_size": 32, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 1,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
}  # fmt: skip

_GGUF_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}  # fmt: skip


def gguf_name(hf_name: str) -> str:
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    if hf_name in top | {"lm_head.weight": ""}:
        return (top | {"lm_head.weight": "output.weight"})[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{_GGUF_NAMES[module]}.{kind}"


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """The converter's reordering: per head, rows split in halves (HF) -> interleaved pairs (GGML)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path: Path, cfg: dict, tensors: dict[str, np.ndarray], encode=None, rope_freqs=None) -> None:
    """Write ``tensors`` (HF names, float32) as llama.cpp would. ``encode(name, array)`` returns
    ``(data, raw_dtype or None)`` for 2-D tensors; default F32."""
    arch = cfg["model_type"]
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_rope_dimension_count(cfg["head_dim"])
    w.add_rope_freq_base(cfg["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"tok{i}" for i in range(cfg["vocab_size"])])
    w.add_bos_token_id(cfg["bos_token_id"])
    w.add_eos_token_id(cfg["eos_token_id"])
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    for name, value in tensors.items():
        if arch == "llama" and ".q_proj." in name:
            value = llama_cpp_permute(value, cfg["num_attention_heads"])
        if arch == "llama" and ".k_proj." in name:
            value = llama_cpp_permute(value, cfg["num_key_value_heads"])
        data, raw_dtype = encode(name, value) if (encode and value.ndim == 2) else (value, None)
        w.add_tensor(gguf_name(name), data, raw_dtype=raw_dtype)
    finish(w)


def finish(w) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def random_tensors(cfg: dict, seed: int = 0) -> dict[str, np.ndarray]:
    weights = dummy_weights(cfg, torch.float32, "cpu", seed)
    # Distinct norm values too, so a swapped norm would be caught.
    return {n: (t + 0.1 * torch.randn_like(t)).numpy() for n, t in weights.tensors.items()}


def test_llama_f32_round_trip_undoes_rotary_permutation(tmp_path: Path) -> None:
    original = random_tensors(TINY_LLAMA)
    write_gguf(tmp_path / "m.gguf", TINY_LLAMA, original)
    loaded = load_gguf(tmp_path / "m.gguf", torch.float32)
    assert set(loaded.tensors) == set(original)
    for name, value in original.items():
        torch.testing.assert_close(loaded.tensors[name], torch.from_numpy(value), rtol=0, atol=0, msg=name)
    assert ModelConfig.from_hf_dict(loaded.hf_config) == ModelConfig.from_hf_dict(TINY_LLAMA)
    assert loaded.hf_config["tie_word_embeddings"] is False


def test_qwen2_f16_round_trip_keeps_bias_and_is_not_permuted(tmp_path: Path) -> None:
    original = random_tensors(TINY_QWEN2)
    assert "model.layers.0.self_attn.q_proj.bias" in original and "lm_head.weight" not in original
    write_gguf(tmp_path / "q.gguf", TINY_QWEN2, original, encode=lambda n, v: (v.astype(np.float16), None))
    loaded = load_gguf(tmp_path / "q.gguf", torch.bfloat16)
    assert set(loaded.tensors) == set(original)
    for name, value in original.items():
        assert loaded.tensors[name].dtype == torch.bfloat16
        expected = torch.from_numpy(value.astype(np.float16).astype(np.float32))
        torch.testing.assert_close(loaded.tensors[name].float(), expected, rtol=1e-2, atol=1e-3, msg=name)
    cfg = ModelConfig.from_hf_dict(loaded.hf_config)
    assert cfg == ModelConfig.from_hf_dict(TINY_QWEN2)
    assert cfg.attention_bias and cfg.tie_word_embeddings and cfg.architecture == "Qwen2ForCausalLM"


# Worst-case error of each block format, as a fraction of the block's value range (max - min).
_LIBRARY_QUANTS = {
    Q.Q8_0: 1 / 127,
    Q.Q4_0: 1 / 7,
    Q.Q4_1: 1 / 15,
    Q.Q5_0: 1 / 15,
    Q.Q5_1: 1 / 31,
    Q.BF16: 1 / 128,
}


@pytest.mark.parametrize("qtype", list(_LIBRARY_QUANTS), ids=lambda q: q.name)
def test_block_quantized_types_dequantize_within_quantization_error(tmp_path: Path, qtype: Q) -> None:
    original = random_tensors(TINY_LLAMA)
    write_gguf(tmp_path / "m.gguf", TINY_LLAMA, original, encode=lambda n, v: (quantize(v, qtype), qtype))
    loaded = load_gguf(tmp_path / "m.gguf", torch.float32)
    block = 32
    for name, value in original.items():
        got = loaded.tensors[name].numpy()
        if value.ndim == 1:  # norms stay F32, as llama.cpp writes them
            np.testing.assert_array_equal(got, value)
            continue
        err = np.abs(got - value).reshape(-1, block).max(axis=1)
        span = np.ptp(value.reshape(-1, block), axis=1)
        assert np.all(err <= _LIBRARY_QUANTS[qtype] * span + 1e-6), (name, float(err.max()))


# --- K-quants: pack super-blocks of 256 values by hand -------------------------------------------


def _f16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).astype(np.float32)


def _pack_scales_k4(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """8 six-bit scales and mins per block -> the 12-byte Q4_K/Q5_K encoding."""
    out = np.zeros((sc.shape[0], 12), dtype=np.uint8)
    out[:, 0:4] = (sc[:, :4] & 63) | ((sc[:, 4:] >> 4) << 6)
    out[:, 4:8] = (mn[:, :4] & 63) | ((mn[:, 4:] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:] & 15) | ((mn[:, 4:] & 15) << 4)
    return out


def quantize_k_asymmetric(x: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K (bits=4) / Q5_K (bits=5): returns (packed uint8 [rows, bytes], reference float32 like x)."""
    rows, cols = x.shape
    levels = (1 << bits) - 1
    blocks = x.reshape(-1, 8, 32).astype(np.float32)  # super-block -> 8 sub-blocks of 32
    lo = np.minimum(blocks.min(axis=2), 0.0)
    sub_scale = (blocks.max(axis=2) - lo) / levels
    d = _f16(sub_scale.max(axis=1) / 63)
    dmin = _f16(-lo.min(axis=1) / 63)
    sc = np.clip(np.round(sub_scale / np.maximum(d[:, None], 1e-12)), 1, 63).astype(np.uint8)
    mn = np.clip(np.round(-lo / np.maximum(dmin[:, None], 1e-12)), 0, 63).astype(np.uint8)
    scale = (d[:, None] * sc)[:, :, None]
    offset = (dmin[:, None] * mn)[:, :, None]
    q = np.clip(np.round((blocks + offset) / scale), 0, levels).astype(np.uint8)
    reference = (scale * q - offset).reshape(rows, cols)
    qf = q.reshape(-1, 4, 2, 32)  # chunk of 64 = (low sub-block, high sub-block)
    qs = ((qf[:, :, 0] & 15) | ((qf[:, :, 1] & 15) << 4)).reshape(-1, 128)
    parts = [
        d.astype(np.float16).view(np.uint8).reshape(-1, 2),
        dmin.astype(np.float16).view(np.uint8).reshape(-1, 2),
    ]
    parts.append(_pack_scales_k4(sc, mn))
    if bits == 5:
        high = (qf >> 4) & 1  # [n, chunk, half, 32] -> bit (2 * chunk + half) of qh[l]
        shifts = (2 * np.arange(4)[:, None] + np.arange(2)[None, :])[None, :, :, None]
        parts.append((high << shifts).sum(axis=(1, 2)).astype(np.uint8))
    parts.append(qs)
    return np.concatenate(parts, axis=1).reshape(rows, -1), reference


def quantize_q6_k(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    rows, cols = x.shape
    blocks = x.reshape(-1, 16, 16).astype(np.float32)  # super-block -> 16 sub-blocks of 16
    sub_scale = np.abs(blocks).max(axis=2) / 31
    d = _f16(sub_scale.max(axis=1) / 127)
    sc = np.clip(np.round(sub_scale / np.maximum(d[:, None], 1e-12)), 1, 127).astype(np.int8)
    scale = (d[:, None] * sc)[:, :, None]
    q = np.clip(np.round(blocks / scale), -32, 31)
    reference = (scale * q).reshape(rows, cols)
    u = (q.reshape(-1, 2, 4, 32) + 32).astype(np.uint8)  # [n, half, group of 32, l]
    ql = np.concatenate(
        [(u[:, :, 0] & 15) | ((u[:, :, 2] & 15) << 4), (u[:, :, 1] & 15) | ((u[:, :, 3] & 15) << 4)], axis=2
    )
    qh = sum(((u[:, :, g] >> 4) & 3) << (2 * g) for g in range(4)).astype(np.uint8)
    packed = np.concatenate(
        [
            ql.reshape(-1, 128),
            qh.reshape(-1, 64),
            sc.view(np.uint8),
            d.astype(np.float16).view(np.uint8).reshape(-1, 2),
        ],
        axis=1,
    )
    return packed.reshape(rows, -1), reference


_K_QUANTS = {
    Q.Q4_K: (lambda x: quantize_k_asymmetric(x, 4), 1 / 15),
    Q.Q5_K: (lambda x: quantize_k_asymmetric(x, 5), 1 / 31),
    Q.Q6_K: (quantize_q6_k, 1 / 31),
}


@pytest.mark.parametrize("qtype", list(_K_QUANTS), ids=lambda q: q.name)
def test_k_quants_match_reference_dequantization(tmp_path: Path, qtype: Q) -> None:
    pack, rel_err = _K_QUANTS[qtype]
    original = random_tensors(K_QUANT_LLAMA)
    references: dict[str, np.ndarray] = {}

    def encode(name: str, value: np.ndarray):
        packed, references[name] = pack(value)
        return packed, qtype

    write_gguf(tmp_path / "k.gguf", K_QUANT_LLAMA, original, encode=encode)
    loaded = load_gguf(tmp_path / "k.gguf", torch.float32)
    heads = {
        ".q_proj.": K_QUANT_LLAMA["num_attention_heads"],
        ".k_proj.": K_QUANT_LLAMA["num_key_value_heads"],
    }
    for name, value in original.items():
        if value.ndim == 1:
            continue
        reference = references[name]  # computed on the permuted rows: permute the loaded tensor back
        got = loaded.tensors[name].numpy()
        for key, n_head in heads.items():
            if key in name:
                got = llama_cpp_permute(got, n_head)
        np.testing.assert_allclose(got, reference, rtol=1e-5, atol=1e-6, err_msg=name)
        # and the reference itself is a faithful quantization of what we wrote
        assert np.abs(loaded.tensors[name].numpy() - value).max() <= rel_err * np.ptp(value) * 1.5, name


def test_llama3_rope_scaling_recovered_from_rope_freqs(tmp_path: Path) -> None:
    cfg = TINY_LLAMA | {"rope_theta": 500000.0, "max_position_embeddings": 131072}
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
    scaling["original_max_position_embeddings"] = 8192
    freqs = llama3_rope_divisors(500000.0, cfg["head_dim"], 8.0, 1.0, 4.0, 8192)
    assert freqs.min() == 1.0 and freqs.max() == 8.0  # the tiny head still spans all three bands
    write_gguf(tmp_path / "m.gguf", cfg, random_tensors(cfg), rope_freqs=freqs)
    loaded = load_gguf(tmp_path / "m.gguf", torch.float32)
    assert loaded.hf_config["rope_scaling"] == scaling
    assert "rope_freqs.weight" not in loaded.tensors
    assert ModelConfig.from_hf_dict(loaded.hf_config).rope_scaling_dict == scaling


def test_unsupported_quant_type_is_named(tmp_path: Path) -> None:
    cfg = K_QUANT_LLAMA
    original = random_tensors(cfg)
    q2k_bytes = gguf.GGML_QUANT_SIZES[Q.Q2_K][1]

    def encode(name: str, value: np.ndarray):
        if name.endswith("down_proj.weight"):
            rng = np.random.default_rng(0)
            return rng.integers(
                0, 255, (value.shape[0], value.shape[1] // 256 * q2k_bytes), dtype=np.uint8
            ), Q.Q2_K
        return value, None

    write_gguf(tmp_path / "m.gguf", cfg, original, encode=encode)
    with pytest.raises(ValueError, match=r"blk\.0\.ffn_down\.weight uses type Q2_K"):
        load_gguf(tmp_path / "m.gguf", torch.float32)


def test_unknown_architecture_and_tensor_are_refused(tmp_path: Path) -> None:
    w = gguf.GGUFWriter(str(tmp_path / "gpt2.gguf"), "gpt2")
    w.add_tensor("token_embd.weight", np.zeros((4, 4), np.float32))
    finish(w)
    with pytest.raises(ValueError, match="architecture 'gpt2' is not supported"):
        load_gguf(tmp_path / "gpt2.gguf", torch.float32)

    # A known GGUF name the config does not call for (an MLP bias): named as unexpected.
    tensors = random_tensors(TINY_LLAMA) | {"model.layers.0.mlp.gate_proj.bias": np.zeros(128, np.float32)}
    write_gguf(tmp_path / "extra.gguf", TINY_LLAMA, tensors)
    with pytest.raises(ValueError, match="unexpected 1: .*gate_proj.bias"):
        load_gguf(tmp_path / "extra.gguf", torch.float32)

    # A GGUF name we have no mapping for (fused QKV): refused by name.
    w = gguf.GGUFWriter(str(tmp_path / "fused.gguf"), "llama")
    meta = {"block_count": 1, "embedding_length": 4, "feed_forward_length": 8, "attention.head_count": 1}
    for key, value in (meta | {"vocab_size": 4}).items():
        w.add_uint32(f"llama.{key}", value)
    w.add_tensor("blk.0.attn_qkv.weight", np.zeros((12, 4), np.float32))
    finish(w)
    with pytest.raises(ValueError, match="unknown GGUF tensor 'blk.0.attn_qkv.weight'"):
        load_gguf(tmp_path / "fused.gguf", torch.float32)
