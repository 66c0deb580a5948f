"""Streaming detokenization: the deltas add up to the one-shot decode, with no broken characters."""

from __future__ import annotations

import random
import re

import pytest

from baton.text import IncrementalDetokenizer, Tokenizer

TEXTS = [
    "The capital of France is Paris.",
    "Ça va très bien, merci ! Grüße aus Köln.",
    "日本語のテキストと中文字符，还有한국어.",
    "Emoji: 🎉👍🏽🇫🇷 and math ∑∫√ and   spaces\tand\nlines.",
]
_BYTE_TOKEN = re.compile(r"<0x[0-9A-F]{2}>")
STRATEGIES = [pytest.param(None, id="decode_stream"), pytest.param(False, id="prefix_offset")]


def stream(tok: Tokenizer, prompt: list[int], gen: list[int], skip: bool, strategy: bool | None) -> list[str]:
    detok = IncrementalDetokenizer(tok, prompt, skip_special_tokens=skip, use_decode_stream=strategy)
    return [detok.push(t) for t in gen] + [detok.flush()]


def expected(tok: Tokenizer, prompt: list[int], gen: list[int], skip: bool) -> str:
    return tok.decode(prompt + gen, skip)[len(tok.decode(prompt, skip)) :]


def token_streams(tok: Tokenizer, seed: int) -> list[list[int]]:
    """Encoded text (multi-byte characters split across tokens), specials mixed in, and pure noise."""
    rng = random.Random(seed)
    specials = [i for i in tok.eos_token_ids] + ([tok.bos_token_id] if tok.bos_token_id is not None else [])
    streams = []
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        streams.append(ids)
        # Special tokens between characters (inside one, they would make its bytes invalid UTF-8).
        boundaries = [p for p in range(len(ids) + 1) if not tok.decode(ids[:p], False).endswith("\ufffd")]
        mixed = list(ids)
        for pos in sorted(rng.sample(boundaries, 3), reverse=True):
            mixed.insert(pos, rng.choice(specials))
        streams.append(mixed)
    # Noise: any token except byte-fallback ones (<0xNN>). A run of those that is not valid UTF-8 has no
    # single right rendering (one U+FFFD per byte when decoded whole, the raw char when split), so only
    # valid byte runs (from encoded text above) are checked.
    noise = [i for i in range(tok.vocab_size) if not _BYTE_TOKEN.fullmatch(tok.backend.id_to_token(i) or "")]
    streams += [[rng.choice(noise) for _ in range(60)] for _ in range(10)]
    return streams


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("skip", [True, False])
@pytest.mark.parametrize("which", ["smollm2", "sentencepiece"])
def test_deltas_concatenate_to_full_decode(request, which: str, skip: bool, strategy) -> None:
    tok: Tokenizer = request.getfixturevalue(which)
    prompts = [[], tok.encode("Question: where?", add_special_tokens=False)]
    for seed, gen in enumerate(token_streams(tok, seed=0)):
        for prompt in prompts:
            deltas = stream(tok, prompt, gen, skip, strategy)
            assert "".join(deltas) == expected(tok, prompt, gen, skip), (which, seed, prompt)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("which", ["smollm2", "sentencepiece"])
def test_valid_text_streams_without_replacement_characters(request, which: str, strategy) -> None:
    tok: Tokenizer = request.getfixturevalue(which)
    prompt = tok.encode("Answer:", add_special_tokens=False)
    for text in TEXTS:
        gen = tok.encode(" " + text, add_special_tokens=False)
        deltas = stream(tok, prompt, gen, True, strategy)
        assert not any("\ufffd" in d for d in deltas), deltas
        assert deltas[-1] == "", "nothing may be held back once the text is complete"
        assert "".join(deltas) == " " + text  # the leading space survives (SentencePiece drops it alone)
        assert sum(1 for d in deltas if d) > 1, "text must stream, not arrive at the end"


def test_split_character_is_held_until_complete(smollm2: Tokenizer) -> None:
    ids = smollm2.encode("🎉", add_special_tokens=False)
    assert len(ids) > 1  # byte-level: the emoji's 4 bytes span several tokens
    detok = IncrementalDetokenizer(smollm2, [])
    assert [detok.push(i) for i in ids] == [""] * (len(ids) - 1) + ["🎉"]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_invalid_byte_run_does_not_break_the_stream(sentencepiece: Tokenizer, strategy) -> None:
    # '{' then two lead bytes of a 3-byte character that never completes: tokenizers' DecodeStream
    # raises on what follows ("invalid prefix"); the detokenizer must carry on and keep streaming.
    garbage = [sentencepiece.token_to_id(f"<0x{b:02X}>") for b in (0x7B, 0xE6, 0xE6)]
    tail = sentencepiece.encode(" Paris is the capital.", add_special_tokens=False)
    deltas = stream(sentencepiece, [], garbage + tail, True, strategy)
    joined, whole = "".join(deltas), sentencepiece.decode(garbage + tail)
    # The invalid bytes may render differently (one char each either way); everything after is exact.
    assert joined.endswith(" Paris is the capital.") and len(joined) == len(whole), (joined, whole)
    assert sum(1 for d in deltas[len(garbage) :] if d) > 3, "text after the garbage must still stream"
