"""Benchmark workloads: seeded lists of requests with known prompt and output lengths.

Every dataset is a pure function of (its spec, the number of prompts, a seed, the text builder):
the same inputs give the same requests, which is what makes runs comparable across servers.

Lengths are in tokens. Prompts are text, so a length is honoured approximately: the text builder
turns N tokens into ``round(N / tokens_per_word)`` words from a fixed word list. With the server's
``/tokenize`` endpoint the ratio is measured first (see ``client.measure_tokens_per_word``); without
it the default below is used. The output length is exact when the server honours ``ignore_eos``.

Datasets:
- ``random``: independent prompts, lengths uniform in ``[L*(1-r), L*(1+r)]`` (r = range ratio).
- ``sharegpt``: the real ShareGPT JSON (first human turn -> first model turn) when a path is given,
  otherwise lognormal lengths shaped like it (parameters and reasons at ``SHAREGPT_SYNTHETIC``).
- ``prefix-repeat``: a few shared system prompts, multi-turn conversations where each turn's
  prompt is the previous turn's prompt plus an assistant reply plus a new user message.
- ``long-mixed``: short chats with long prompts at a fixed fraction, placed at seeded positions.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

from baton.bench.words import WORDS

# Everyday words from ``WORDS`` are one token each in common BPE vocabularies (measured: 1.00 tokens
# per word on a GPT-2-style 49k vocabulary). General English prose is closer to 0.75 words per token,
# which is the ratio used to estimate the length of real (ShareGPT) text.
DEFAULT_TOKENS_PER_WORD = 1.0
PROSE_TOKENS_PER_WORD = 1.0 / 0.75
CHARS_PER_TOKEN = 4.0

DATASET_NAMES = ("random", "sharegpt", "prefix-repeat", "long-mixed")


@dataclass(frozen=True)
class Message:
    role: str  # "system" | "user" | "assistant"
    content: str


@dataclass(frozen=True)
class BenchRequest:
    """One request of a workload.

    ``prompt_len`` is the estimated token count of the message contents (no chat template);
    ``output_len`` is sent as ``max_tokens``. ``kind`` labels the request's class in the workload
    ("short"/"long", "turn-2", ...) so results can be split by it.
    """

    messages: tuple[Message, ...]
    prompt_len: int
    output_len: int
    kind: str = "default"

    def prompt_text(self) -> str:
        """The prompt for the completions endpoint.

        A single user message is sent as-is; a conversation is rendered as ``role: content``
        paragraphs ending with ``assistant:``, so turn k+1's text still starts with turn k's text
        up to that final marker (the shared prefix a prefix cache can reuse).
        """
        if len(self.messages) == 1 and self.messages[0].role == "user":
            return self.messages[0].content
        body = "\n\n".join(f"{m.role}: {m.content}" for m in self.messages)
        return body + "\n\nassistant:"


@dataclass(frozen=True)
class PromptText:
    """Builds text of an approximate token length from ``WORDS``."""

    tokens_per_word: float = DEFAULT_TOKENS_PER_WORD

    def words_for(self, num_tokens: int) -> int:
        return max(1, round(num_tokens / self.tokens_per_word))

    def make(self, num_tokens: int, rng: random.Random) -> str:
        return " ".join(rng.choices(WORDS, k=self.words_for(num_tokens)))


def estimate_prose_tokens(text: str) -> int:
    """Token estimate for real text: the larger of the word- and character-based rules of thumb
    (the character rule keeps text without spaces, e.g. CJK or code, from counting as one word)."""
    by_words = len(text.split()) * PROSE_TOKENS_PER_WORD
    by_chars = len(text) / CHARS_PER_TOKEN
    return max(1, math.ceil(max(by_words, by_chars)))


def sample_len(center: int, range_ratio: float, rng: random.Random) -> int:
    """Uniform integer in ``[int(center*(1-r)), int(center*(1+r))]``, at least 1."""
    if not 0.0 <= range_ratio < 1.0:
        raise ValueError(f"range ratio must be in [0, 1), got {range_ratio}")
    low = max(1, int(center * (1.0 - range_ratio)))
    high = max(low, int(center * (1.0 + range_ratio)))
    return rng.randint(low, high)


@dataclass(frozen=True)
class DatasetSpec:
    """Which workload to build and its shape. Lengths in tokens."""

    name: str = "random"
    path: str | None = None
    range_ratio: float = 0.0
    # random
    random_input_len: int = 1024
    random_output_len: int = 128
    # sharegpt: when set, replaces each conversation's own output length
    sharegpt_output_len: int | None = None
    # prefix-repeat
    num_system_prompts: int = 4
    system_prompt_len: int = 512
    turns_per_conversation: int = 4
    turn_input_len: int = 64
    turn_output_len: int = 64
    # long-mixed
    short_input_len: int = 256
    short_output_len: int = 128
    long_input_len: int = 4096
    long_output_len: int = 128
    long_fraction: float = 0.1

    def __post_init__(self) -> None:
        if self.name not in DATASET_NAMES:
            raise ValueError(f"unknown dataset {self.name!r}; choose one of {', '.join(DATASET_NAMES)}")
        if not 0.0 <= self.long_fraction <= 1.0:
            raise ValueError(f"long fraction must be in [0, 1], got {self.long_fraction}")
        positive = {
            "random_input_len": self.random_input_len,
            "random_output_len": self.random_output_len,
            "num_system_prompts": self.num_system_prompts,
            "system_prompt_len": self.system_prompt_len,
            "turns_per_conversation": self.turns_per_conversation,
            "turn_input_len": self.turn_input_len,
            "turn_output_len": self.turn_output_len,
            "short_input_len": self.short_input_len,
            "short_output_len": self.short_output_len,
            "long_input_len": self.long_input_len,
            "long_output_len": self.long_output_len,
        }
        for field_name, value in positive.items():
            if value < 1:
                raise ValueError(f"{field_name} must be >= 1, got {value}")
        if self.sharegpt_output_len is not None and self.sharegpt_output_len < 1:
            raise ValueError(f"sharegpt_output_len must be >= 1, got {self.sharegpt_output_len}")
        sample_len(1, self.range_ratio, random.Random(0))  # validates the ratio


def build_dataset(spec: DatasetSpec, num_prompts: int, seed: int, text: PromptText) -> list[BenchRequest]:
    """The workload of ``num_prompts`` requests; identical for identical arguments."""
    if num_prompts < 1:
        raise ValueError(f"num_prompts must be >= 1, got {num_prompts}")
    rng = random.Random(seed)
    if spec.name == "random":
        return [
            _single_turn(text, rng, spec.random_input_len, spec.random_output_len, spec.range_ratio, "random")
            for _ in range(num_prompts)
        ]
    if spec.name == "sharegpt":
        if spec.path:
            return _sharegpt_file(Path(spec.path), num_prompts, spec.sharegpt_output_len, rng)
        return _sharegpt_synthetic(num_prompts, spec.sharegpt_output_len, rng, text)
    if spec.name == "prefix-repeat":
        return _prefix_repeat(spec, num_prompts, rng, text)
    return _long_mixed(spec, num_prompts, rng, text)


def _single_turn(
    text: PromptText, rng: random.Random, input_len: int, output_len: int, range_ratio: float, kind: str
) -> BenchRequest:
    prompt_len = sample_len(input_len, range_ratio, rng)
    out_len = sample_len(output_len, range_ratio, rng)
    return BenchRequest((Message("user", text.make(prompt_len, rng)),), prompt_len, out_len, kind)


@dataclass(frozen=True)
class LognormalLengths:
    """Lengths ``round(exp(N(log(median), sigma^2)))``, resampled until they pass the filter."""

    input_median: float
    input_sigma: float
    output_median: float
    output_sigma: float
    min_len: int
    max_input_len: int
    max_total_len: int


# ShareGPT-shaped lengths. The filter is the one commonly applied to ShareGPT_V3 for serving
# benchmarks (both lengths >= 4, prompt <= 1024, prompt + output <= 2048). With Llama-family
# tokenizers that filtered set averages roughly 220 prompt and 200 output tokens per request with
# long right tails (a few prompts near 1k tokens, many under 50), which a lognormal reproduces.
# The medians/sigmas below give means of about 215 (input) and 200 (output) after the filter, with
# medians near 150 and 135 (checked in tests/bench/test_datasets.py). Input and output are drawn
# independently: the benchmark needs the marginal shapes, not the (weak) correlation between them.
SHAREGPT_SYNTHETIC = LognormalLengths(
    input_median=155.0,
    input_sigma=1.0,
    output_median=135.0,
    output_sigma=0.9,
    min_len=4,
    max_input_len=1024,
    max_total_len=2048,
)


def sample_sharegpt_lengths(
    rng: random.Random, shape: LognormalLengths = SHAREGPT_SYNTHETIC
) -> tuple[int, int]:
    for _ in range(10_000):
        prompt_len = round(rng.lognormvariate(math.log(shape.input_median), shape.input_sigma))
        output_len = round(rng.lognormvariate(math.log(shape.output_median), shape.output_sigma))
        if (
            prompt_len >= shape.min_len
            and output_len >= shape.min_len
            and prompt_len <= shape.max_input_len
            and prompt_len + output_len <= shape.max_total_len
        ):
            return prompt_len, output_len
    raise RuntimeError("length filter rejects nearly every sample; check the distribution parameters")


def _sharegpt_synthetic(
    num_prompts: int, output_len_override: int | None, rng: random.Random, text: PromptText
) -> list[BenchRequest]:
    requests = []
    for _ in range(num_prompts):
        prompt_len, output_len = sample_sharegpt_lengths(rng)
        requests.append(
            BenchRequest(
                (Message("user", text.make(prompt_len, rng)),),
                prompt_len,
                output_len_override or output_len,
                "sharegpt",
            )
        )
    return requests


def _sharegpt_file(
    path: Path, num_prompts: int, output_len_override: int | None, rng: random.Random
) -> list[BenchRequest]:
    """First human turn -> prompt, first model turn's length -> output length; same filter as
    the synthetic lengths. Entries are shuffled with the seed, then the first ``num_prompts`` kept."""
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read ShareGPT dataset {path}: {exc}") from exc
    if not isinstance(entries, list):
        raise ValueError(f"ShareGPT dataset {path} must be a JSON list of conversations")
    pairs: list[tuple[str, str]] = []
    for entry in entries:
        turns = entry.get("conversations") if isinstance(entry, dict) else None
        if not isinstance(turns, list) or len(turns) < 2:
            continue
        first, second = turns[0], turns[1]
        if not (isinstance(first, dict) and isinstance(second, dict)):
            continue
        prompt, completion = first.get("value"), second.get("value")
        if isinstance(prompt, str) and isinstance(completion, str):
            pairs.append((prompt, completion))
    rng.shuffle(pairs)
    shape = SHAREGPT_SYNTHETIC
    requests: list[BenchRequest] = []
    for prompt, completion in pairs:
        prompt_len = estimate_prose_tokens(prompt)
        output_len = output_len_override or estimate_prose_tokens(completion)
        too_short = prompt_len < shape.min_len or output_len < shape.min_len
        too_long = prompt_len > shape.max_input_len or prompt_len + output_len > shape.max_total_len
        if too_short or too_long:
            continue
        requests.append(BenchRequest((Message("user", prompt),), prompt_len, output_len, "sharegpt"))
        if len(requests) == num_prompts:
            return requests
    raise ValueError(
        f"ShareGPT dataset {path} has only {len(requests)} usable conversations, {num_prompts} requested"
    )


def _prefix_repeat(
    spec: DatasetSpec, num_prompts: int, rng: random.Random, text: PromptText
) -> list[BenchRequest]:
    """Conversations sharing ``num_system_prompts`` system prompts; turn t's messages are turn
    t-1's plus its (synthetic, fixed) assistant reply and a new user message.

    Requests are ordered turn-major (turn 1 of every conversation, then turn 2, ...), so under any
    finite arrival rate a conversation's earlier turn is sent well before its next one.
    """
    system_prompts = [
        (text.make(spec.system_prompt_len, rng), spec.system_prompt_len)
        for _ in range(spec.num_system_prompts)
    ]
    num_conversations = math.ceil(num_prompts / spec.turns_per_conversation)
    conversations: list[list[BenchRequest]] = []
    for _ in range(num_conversations):
        system_text, system_len = rng.choice(system_prompts)
        messages = [Message("system", system_text)]
        prompt_len = system_len
        turns = []
        for turn in range(1, spec.turns_per_conversation + 1):
            user_len = sample_len(spec.turn_input_len, spec.range_ratio, rng)
            messages.append(Message("user", text.make(user_len, rng)))
            prompt_len += user_len
            turns.append(BenchRequest(tuple(messages), prompt_len, spec.turn_output_len, f"turn-{turn}"))
            messages.append(Message("assistant", text.make(spec.turn_output_len, rng)))
            prompt_len += spec.turn_output_len
        conversations.append(turns)
    ordered = [conv[t] for t in range(spec.turns_per_conversation) for conv in conversations]
    return ordered[:num_prompts]


def _long_mixed(
    spec: DatasetSpec, num_prompts: int, rng: random.Random, text: PromptText
) -> list[BenchRequest]:
    """Exactly ``round(long_fraction * num_prompts)`` long prompts at seeded random positions."""
    num_long = round(spec.long_fraction * num_prompts)
    long_positions = set(rng.sample(range(num_prompts), num_long))
    requests = []
    for i in range(num_prompts):
        if i in long_positions:
            requests.append(
                _single_turn(text, rng, spec.long_input_len, spec.long_output_len, spec.range_ratio, "long")
            )
        else:
            requests.append(
                _single_turn(
                    text, rng, spec.short_input_len, spec.short_output_len, spec.range_ratio, "short"
                )
            )
    return requests
