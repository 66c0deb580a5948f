"""Datasets: reproducible from the seed and shaped as requested."""

import json
import random
import statistics

import pytest

from baton.bench.datasets import (
    SHAREGPT_SYNTHETIC,
    DatasetSpec,
    PromptText,
    build_dataset,
    sample_len,
    sample_sharegpt_lengths,
)
from baton.bench.words import WORDS

TEXT = PromptText(1.0)


@pytest.mark.parametrize("name", ["random", "sharegpt", "prefix-repeat", "long-mixed"])
def test_same_seed_same_requests_other_seed_other_requests(name):
    spec = DatasetSpec(
        name=name, random_input_len=64, system_prompt_len=32, long_input_len=300, range_ratio=0.2
    )
    first = build_dataset(spec, 40, seed=7, text=TEXT)
    assert first == build_dataset(spec, 40, seed=7, text=TEXT)
    assert first != build_dataset(spec, 40, seed=8, text=TEXT)
    assert len(first) == 40


def test_random_lengths_respect_range_and_word_budget():
    spec = DatasetSpec(name="random", random_input_len=100, random_output_len=50, range_ratio=0.25)
    requests = build_dataset(spec, 300, seed=1, text=PromptText(2.0))
    for r in requests:
        assert 75 <= r.prompt_len <= 125
        assert 37 <= r.output_len <= 62
        (message,) = r.messages
        words = message.content.split()
        assert len(words) == round(r.prompt_len / 2.0)  # 2 tokens per word -> half as many words
        assert set(words) <= set(WORDS)
    lens = {r.prompt_len for r in requests}
    assert min(lens) <= 80 and max(lens) >= 120  # the whole range is used
    exact = build_dataset(DatasetSpec(random_input_len=33, random_output_len=7), 20, seed=1, text=TEXT)
    assert {(r.prompt_len, r.output_len) for r in exact} == {(33, 7)}
    assert all(len(r.messages[0].content.split()) == 33 for r in exact)


def test_random_prompts_differ_from_each_other():
    requests = build_dataset(DatasetSpec(random_input_len=64), 50, seed=3, text=TEXT)
    first_words = {tuple(r.messages[0].content.split()[:8]) for r in requests}
    assert len(first_words) == 50  # no shared prefix for a prefix cache to reuse


def test_sample_len_bounds():
    rng = random.Random(0)
    draws = [sample_len(10, 0.5, rng) for _ in range(2000)]
    assert min(draws) == 5 and max(draws) == 15
    with pytest.raises(ValueError):
        sample_len(10, 1.0, rng)


def test_synthetic_sharegpt_length_distribution():
    rng = random.Random(0)
    pairs = [sample_sharegpt_lengths(rng) for _ in range(20_000)]
    inputs = [p for p, _ in pairs]
    outputs = [o for _, o in pairs]
    shape = SHAREGPT_SYNTHETIC
    assert all(p >= shape.min_len and o >= shape.min_len for p, o in pairs)
    assert all(p <= shape.max_input_len and p + o <= shape.max_total_len for p, o in pairs)
    assert 200 <= statistics.mean(inputs) <= 230
    assert 185 <= statistics.mean(outputs) <= 215
    assert 135 <= statistics.median(inputs) <= 165
    assert max(inputs) > 900  # heavy right tail
    assert sum(p < 50 for p in inputs) / len(inputs) > 0.05  # and many short prompts


def test_sharegpt_file(tmp_path):
    long_answer = " ".join(["word"] * 60)
    entries = [
        {
            "id": "a",
            "conversations": [
                {"from": "human", "value": "tell me about trees please"},
                {"from": "gpt", "value": long_answer},
            ],
        },
        {
            "id": "b",
            "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": long_answer}],
        },  # too short
        {"id": "c", "conversations": [{"from": "human", "value": "only one turn here"}]},
        {
            "id": "d",
            "conversations": [
                {"from": "human", "value": "explain how rivers form over time"},
                {"from": "gpt", "value": long_answer},
            ],
        },
        "not a dict",
    ]
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(entries))
    requests = build_dataset(DatasetSpec(name="sharegpt", path=str(path)), 2, seed=0, text=TEXT)
    prompts = sorted(r.messages[0].content for r in requests)
    assert prompts == ["explain how rivers form over time", "tell me about trees please"]
    assert all(r.output_len == 80 for r in requests)  # 60 words at 0.75 words per token
    fixed = build_dataset(
        DatasetSpec(name="sharegpt", path=str(path), sharegpt_output_len=9), 2, seed=0, text=TEXT
    )
    assert {r.output_len for r in fixed} == {9}
    with pytest.raises(ValueError, match="only 2 usable"):
        build_dataset(DatasetSpec(name="sharegpt", path=str(path)), 3, seed=0, text=TEXT)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="cannot read"):
        build_dataset(DatasetSpec(name="sharegpt", path=str(path)), 1, seed=0, text=TEXT)


def test_prefix_repeat_turns_extend_previous_turn():
    spec = DatasetSpec(
        name="prefix-repeat",
        num_system_prompts=2,
        system_prompt_len=40,
        turns_per_conversation=3,
        turn_input_len=10,
        turn_output_len=5,
    )
    requests = build_dataset(spec, 12, seed=5, text=TEXT)  # 4 conversations x 3 turns
    assert [r.kind for r in requests] == ["turn-1"] * 4 + ["turn-2"] * 4 + ["turn-3"] * 4
    assert len({r.messages[0].content for r in requests}) <= 2  # shared system prompts
    for conv in range(4):
        turns = [requests[conv + 4 * t] for t in range(3)]
        for prev, nxt in zip(turns, turns[1:], strict=False):
            assert nxt.messages[: len(prev.messages)] == prev.messages
            assert [m.role for m in nxt.messages[len(prev.messages) :]] == ["assistant", "user"]
            assert nxt.prompt_len == prev.prompt_len + 5 + 10
            assert nxt.prompt_text().startswith(prev.prompt_text())  # completions text shares the prefix
        assert turns[0].prompt_len == 40 + 10
        assert all(t.output_len == 5 for t in turns)
    assert len(build_dataset(spec, 7, seed=5, text=TEXT)) == 7


def test_long_mixed_fraction_and_lengths():
    spec = DatasetSpec(
        name="long-mixed",
        short_input_len=20,
        short_output_len=8,
        long_input_len=500,
        long_output_len=4,
        long_fraction=0.15,
    )
    requests = build_dataset(spec, 200, seed=2, text=TEXT)
    long = [r for r in requests if r.kind == "long"]
    short = [r for r in requests if r.kind == "short"]
    assert len(long) == 30 and len(short) == 170
    assert {(r.prompt_len, r.output_len) for r in long} == {(500, 4)}
    assert {(r.prompt_len, r.output_len) for r in short} == {(20, 8)}
    positions = [i for i, r in enumerate(requests) if r.kind == "long"]
    assert positions[0] < 50 and positions[-1] > 150  # spread among the short chats, not bunched


def test_spec_validation():
    with pytest.raises(ValueError, match="unknown dataset"):
        DatasetSpec(name="nope")
    with pytest.raises(ValueError):
        DatasetSpec(long_fraction=1.5)
    with pytest.raises(ValueError):
        DatasetSpec(random_input_len=0)
    with pytest.raises(ValueError):
        DatasetSpec(range_ratio=1.0)
    with pytest.raises(ValueError):
        build_dataset(DatasetSpec(), 0, seed=0, text=TEXT)
