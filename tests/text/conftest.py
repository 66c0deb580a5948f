"""Tokenizer folders for the text tests: the real default model's, and a small SentencePiece-style one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, pre_tokenizers, trainers

from baton.text import Tokenizer


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The tokenizer the engine exports from the default GGUF (downloaded/exported on first use)."""
    pytest.importorskip("gguf")
    from engine.model_source import resolve_model

    return Path(resolve_model(None).tokenizer_dir)


@pytest.fixture(scope="session")
def smollm2(smollm2_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(smollm2_dir)


_CORPUS = [
    "The capital of France is Paris.",
    "Ça va très bien, merci beaucoup !",
    "Hello world, hello there; numbers 12345.",
]


@pytest.fixture(scope="session")
def sentencepiece_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Llama-2 style: Metaspace ("▁" = space, leading space only on the first word) and byte fallback
    (characters outside the vocabulary become <0xNN> byte tokens)."""
    backend = Backend(models.BPE(unk_token="<unk>", byte_fallback=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    backend.decoder = decoders.Sequence(
        [decoders.ByteFallback(), decoders.Metaspace(replacement="▁", prepend_scheme="first")]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False
    )
    backend.train_from_iterator(_CORPUS * 10, trainer)
    data = json.loads(backend.to_str())
    vocab = data["model"]["vocab"]
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    folder = tmp_path_factory.mktemp("sp")
    (folder / "tokenizer.json").write_text(json.dumps(data))
    config = {
        "bos_token": "<s>",
        "eos_token": "</s>",
        "add_bos_token": True,
        "chat_template": "{{ bos_token }}",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="session")
def sentencepiece(sentencepiece_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(sentencepiece_dir)
