"""baton.text.Tokenizer against HF transformers (the oracle) on the default model's tokenizer."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from baton.text import Tokenizer

SAMPLES = [
    "What is the capital of France?",
    "  leading spaces, tabs\tand\nnewlines  ",
    "Ça va très bien — 日本語のテキスト 🎉🎉",
    "<|im_start|>user\nhi<|im_end|>",
    "",
]
CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Ünïcödé?"},
    ],
]


def test_default_tokenizer_matches_transformers(smollm2_dir: Path, smollm2: Tokenizer) -> None:
    from transformers import AutoTokenizer

    oracle = AutoTokenizer.from_pretrained(str(smollm2_dir))
    for text in SAMPLES:
        for special in (True, False):
            assert smollm2.encode(text, add_special_tokens=special) == oracle.encode(
                text, add_special_tokens=special
            )
        ids = oracle.encode(text)
        for skip in (True, False):
            assert smollm2.decode(ids, skip_special_tokens=skip) == oracle.decode(
                ids, skip_special_tokens=skip
            )
    for messages in CONVERSATIONS:
        for gen in (True, False):
            ours = smollm2.apply_chat_template(messages, add_generation_prompt=gen)
            assert ours == oracle.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False)


def test_default_tokenizer_facts(smollm2: Tokenizer) -> None:
    assert smollm2.vocab_size == 49152
    assert smollm2.eos_token_ids == (2,) and smollm2.eos_token == "<|im_end|>"
    assert smollm2.bos_token_id == 1 and not smollm2.add_bos_token
    assert smollm2.decode(smollm2.encode(SAMPLES[2])) == SAMPLES[2]


def test_add_bos_token_from_config(sentencepiece: Tokenizer) -> None:
    bos = sentencepiece.bos_token_id
    ids = sentencepiece.encode("Paris")
    assert ids[0] == bos and ids.count(bos) == 1
    assert bos not in sentencepiece.encode("Paris", add_special_tokens=False)
    assert sentencepiece.decode(ids) == "Paris"
    assert sentencepiece.eos_token_ids == (sentencepiece.token_to_id("</s>"),)


def test_config_variants(tmp_path: Path, smollm2_dir: Path) -> None:
    shutil.copy(smollm2_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    # transformers >= 5 writes the template to its own file; older configs list named templates.
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<|im_end|>"}}))
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}[{{ m.content }}]{% endfor %}")
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "[x]"
    assert tok.eos_token_ids == (2, 0)

    named = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": named}))
    assert Tokenizer.from_dir(tmp_path).apply_chat_template([]) == "D"

    (tmp_path / "chat_template.jinja").unlink()
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(ValueError, match="no chat template"):
        Tokenizer.from_dir(tmp_path).apply_chat_template([])
    with pytest.raises(ValueError, match="no tokenizer.json"):
        Tokenizer.from_dir(tmp_path / "nowhere")


def test_baton_text_never_imports_torch(smollm2_dir: Path) -> None:
    code = (
        "import sys, baton.text as t\n"
        f"tok = t.Tokenizer.from_dir({str(smollm2_dir)!r})\n"
        "d = t.IncrementalDetokenizer(tok, tok.encode('hi'))\n"
        "assert ''.join(d.push(i) for i in tok.encode(' there')) == ' there'\n"
        "tok.apply_chat_template([{'role': 'user', 'content': 'x'}])\n"
        "bad = [m for m in ('torch', 'engine', 'transformers') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60, cwd=Path(__file__).parents[2])


def test_cover_ids_gives_every_model_id_text_and_keeps_the_rest(smollm2_dir: Path) -> None:
    from baton.text.detokenizer import IncrementalDetokenizer

    tok = Tokenizer.from_dir(smollm2_dir)  # its own instance: covering changes it
    own = tok.vocab_size
    text = "What is the capital of France?"
    before = tok.encode(text), tok.decode([100, 200])
    tok.cover_ids(own + 1000)
    assert tok.vocab_size == own + 1000
    assert (tok.encode(text), tok.decode([100, 200])) == before  # the tokenizer's own ids are untouched
    assert tok.decode([own, own + 999]) == f" <{own}> <{own + 999}>"
    detok = IncrementalDetokenizer(tok, tok.encode(text))
    assert [detok.push(i) for i in (own + 5, own + 6)] == [f" <{own + 5}>", f" <{own + 6}>"]  # one delta each
    tok.cover_ids(own + 10)  # already covered: nothing changes
    assert tok.vocab_size == own + 1000


def test_encoding_a_long_prompt_lets_other_threads_run(smollm2: Tokenizer) -> None:
    # The router encodes prompts on a worker thread; its event loop (every stream it relays) must
    # keep running meanwhile, so encoding may not hold the GIL from start to end.
    import random
    import threading
    import time

    from baton.bench.words import WORDS

    rng = random.Random(0)
    text = " ".join(rng.choice(WORDS) + str(rng.randrange(100)) for _ in range(20_000))  # ~60,000 tokens
    start = time.perf_counter()
    smollm2.encode(text)
    alone = time.perf_counter() - start
    stop = threading.Event()
    worker = threading.Thread(target=lambda: (smollm2.encode(text), stop.set()))
    ticks = [time.perf_counter()]
    worker.start()
    while not stop.is_set():
        time.sleep(0.001)
        ticks.append(time.perf_counter())
    worker.join()
    longest_pause = max(b - a for a, b in zip(ticks, ticks[1:], strict=False))
    assert longest_pause < max(alone / 4, 0.02), (longest_pause, alone)
