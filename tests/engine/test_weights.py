"""Weight loading from HF safetensors folders and random dummy weights; dispatch on the source kind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from engine.config import ModelConfig
from engine.model_source import ModelSource
from engine.weights import (
    DUMMY_SHAPES,
    dummy_hf_config,
    dummy_weights,
    expected_shapes,
    load_hf_folder,
    load_weights,
)

SMALL = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "vocab_size": 128}


def save_hf_model(folder: Path, shape: str, **save_kwargs) -> dict[str, torch.Tensor]:
    """Save a random HF transformers model (the real ``save_pretrained`` output); returns its state dict."""
    cfg = AutoConfig.for_model(**(dummy_hf_config(shape) | SMALL))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(folder, **save_kwargs)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("shape", ["tiny-llama", "tiny-qwen2"])
def test_hf_folder_gives_back_hf_state_dict(tmp_path: Path, shape: str) -> None:
    state = save_hf_model(tmp_path, shape)
    loaded = load_hf_folder(tmp_path, torch.bfloat16)
    cfg = ModelConfig.from_hf_dict(loaded.hf_config)
    expected_names = set(state) - ({"lm_head.weight"} if cfg.tie_word_embeddings else set())
    assert set(loaded.tensors) == expected_names
    for name in expected_names:
        assert loaded.tensors[name].dtype == torch.bfloat16
        torch.testing.assert_close(loaded.tensors[name], state[name].to(torch.bfloat16), rtol=0, atol=0)
    assert cfg.attention_bias == (shape == "tiny-qwen2")


def test_sharded_hf_folder(tmp_path: Path) -> None:
    state = save_hf_model(tmp_path, "tiny-llama", max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    loaded = load_hf_folder(tmp_path, torch.float32)
    assert set(loaded.tensors) == set(state)
    for name, value in state.items():
        torch.testing.assert_close(loaded.tensors[name], value, rtol=0, atol=0)


@pytest.mark.parametrize("filename", ["pytorch_model.bin", "model.pt", "consolidated.pth"])
def test_pickle_checkpoint_refused_without_opening_it(tmp_path: Path, filename: str) -> None:
    (tmp_path / "config.json").write_text(json.dumps(dummy_hf_config("tiny-llama")))
    (tmp_path / filename).write_bytes(b"never unpickled")
    with pytest.raises(ValueError, match=rf"refusing to load pickle checkpoint {filename}"):
        load_hf_folder(tmp_path, torch.float32)


def test_incomplete_checkpoint_is_named(tmp_path: Path) -> None:
    save_hf_model(tmp_path, "tiny-llama")
    config = json.loads((tmp_path / "config.json").read_text())
    config["num_hidden_layers"] = 3  # the file only has 2 layers
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"missing \d+: \['model.layers.2"):
        load_hf_folder(tmp_path, torch.float32)


@pytest.mark.parametrize("shape", list(DUMMY_SHAPES))
def test_dummy_shapes_are_valid_hf_configs(shape: str) -> None:
    cfg = ModelConfig.from_hf_dict(dummy_hf_config(shape))
    shapes = expected_shapes(dummy_hf_config(shape))
    assert shapes["model.embed_tokens.weight"] == (cfg.vocab_size, cfg.hidden_size)
    assert ("lm_head.weight" in shapes) != cfg.tie_word_embeddings
    assert cfg.num_heads % cfg.num_kv_heads == 0


def test_named_shapes_match_published_configs() -> None:
    big = ModelConfig.from_hf_dict(dummy_hf_config("llama-3.1-8b"))
    assert (big.num_layers, big.hidden_size, big.num_kv_heads, big.tie_word_embeddings) == (
        32,
        4096,
        8,
        False,
    )
    assert big.rope_scaling_dict == {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }  # fmt: skip
    params = sum(torch.Size(s).numel() for s in expected_shapes(dummy_hf_config("llama-3.1-8b")).values())
    assert 8.0e9 < params < 8.1e9
    qwen = ModelConfig.from_hf_dict(dummy_hf_config("qwen2.5-0.5b"))
    assert qwen.attention_bias and qwen.tie_word_embeddings and qwen.num_kv_heads == 2
    assert "model.layers.0.self_attn.q_proj.bias" in expected_shapes(dummy_hf_config("tiny-qwen2"))


def test_dummy_weights_init_and_determinism() -> None:
    a = dummy_weights("tiny-llama", torch.float32, "cpu", seed=1)
    b = dummy_weights("tiny-llama", torch.float32, "cpu", seed=1)
    c = dummy_weights("tiny-llama", torch.float32, "cpu", seed=2)
    assert set(a.tensors) == set(expected_shapes(a.hf_config))
    for name, t in a.tensors.items():
        assert torch.equal(t, b.tensors[name])
        if name.endswith("norm.weight"):
            assert torch.all(t == 1)
        else:
            assert not torch.equal(t, c.tensors[name])
            assert 0.015 < t.std().item() < 0.025 and abs(t.mean().item()) < 0.01
    qwen = dummy_weights("tiny-qwen2", torch.bfloat16, "cpu", seed=0)
    assert qwen.tensors["model.layers.1.self_attn.v_proj.bias"].dtype == torch.bfloat16
    assert "lm_head.weight" not in qwen.tensors


def test_dummy_weights_from_hf_dict_and_unknown_shape() -> None:
    cfg = dummy_hf_config("tiny-llama") | {"num_hidden_layers": 1}
    assert "model.layers.1.mlp.up_proj.weight" not in dummy_weights(cfg).tensors
    with pytest.raises(ValueError, match="known shapes: llama-3.2-1b"):
        dummy_hf_config("llama-9000")


def test_load_weights_dispatches_on_kind(tmp_path: Path) -> None:
    save_hf_model(tmp_path, "tiny-qwen2")
    from_folder = load_weights(ModelSource("hf_folder", str(tmp_path), "t", None, "x"), torch.float32)
    assert from_folder.model_config.architecture == "Qwen2ForCausalLM"
    dummy = load_weights(ModelSource("dummy", "tiny-llama", "d", None, "x"), torch.float16, "cpu", seed=3)
    assert dummy.tensors["lm_head.weight"].dtype == torch.float16
    assert torch.equal(
        dummy.tensors["lm_head.weight"],
        dummy_weights("tiny-llama", torch.float16, seed=3).tensors["lm_head.weight"],
    )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_dummy_8b_is_generated_on_the_gpu() -> None:
    weights = dummy_weights("llama-3.1-8b", torch.bfloat16, "cuda", seed=0)
    assert all(t.is_cuda and t.dtype == torch.bfloat16 for t in weights.tensors.values())
    assert sum(t.numel() for t in weights.tensors.values()) > 8.0e9
    std = weights.tensors["model.layers.31.mlp.down_proj.weight"].float().std().item()
    assert 0.019 < std < 0.021
