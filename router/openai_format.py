"""OpenAI response shapes (chat.completion[.chunk], text_completion) built from ``ChoiceDelta``s.

A formatter is created per request and accumulates what the non-streaming response and the usage
block need, so streaming and non-streaming answers are built from the same deltas.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from router.generation import ChoiceDelta, LogprobEntry


@dataclass
class _ChoiceAcc:
    text: list[str] = field(default_factory=list)
    logprobs: list[LogprobEntry] = field(default_factory=list)
    num_tokens: int = 0
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    text_offset: int = 0  # completions logprobs: offset of the next token's text
    started: bool = False


class Usage:
    def __init__(self, num_prompts: int) -> None:
        self.prompt_tokens = [0] * num_prompts
        self.cached_tokens = [0] * num_prompts
        self.completion_tokens = 0

    def add(self, delta: ChoiceDelta) -> None:
        if delta.num_prompt_tokens:
            self.prompt_tokens[delta.prompt_index] = delta.num_prompt_tokens
            self.cached_tokens[delta.prompt_index] = max(
                self.cached_tokens[delta.prompt_index], delta.num_cached_tokens
            )
        self.completion_tokens += len(delta.token_ids)

    def to_dict(self) -> dict[str, Any]:
        prompt = sum(self.prompt_tokens)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": self.completion_tokens,
            "total_tokens": prompt + self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": sum(self.cached_tokens)},
        }


def sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


SSE_DONE = "data: [DONE]\n\n"


class Formatter:
    object_name = ""
    chunk_object_name = ""
    id_prefix = ""

    def __init__(
        self, model: str, num_choices: int, num_prompts: int, include_usage: bool, logprobs: bool
    ) -> None:
        self.id = f"{self.id_prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model
        self.include_usage = include_usage
        self.logprobs = logprobs
        self.usage = Usage(num_prompts)
        self.choices = [_ChoiceAcc() for _ in range(num_choices)]

    def _envelope(self, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        return out

    def add(self, delta: ChoiceDelta) -> _ChoiceAcc:
        self.usage.add(delta)
        acc = self.choices[delta.index]
        acc.text.append(delta.text)
        acc.logprobs.extend(delta.logprobs)
        acc.num_tokens += len(delta.token_ids)
        if delta.finish_reason is not None:
            acc.finish_reason, acc.stop_reason = delta.finish_reason, delta.stop_reason
        return acc

    def collect(self, delta: ChoiceDelta) -> None:
        """Non-streaming: accumulate one delta for ``response()``."""
        self.add(delta)

    def chunk(self, delta: ChoiceDelta) -> list[str]:
        """Streaming: the SSE events for one delta (usually one)."""
        raise NotImplementedError

    def response(self) -> dict[str, Any]:
        raise NotImplementedError

    def usage_chunk(self) -> str:
        out = self._envelope(self.chunk_object_name, [])
        out["usage"] = self.usage.to_dict()
        return sse(out)

    def error_chunk(self, error: dict[str, Any]) -> str:
        return sse(error)

    def _stream_envelope(self, choice: dict[str, Any]) -> dict[str, Any]:
        out = self._envelope(self.chunk_object_name, [choice])
        if self.include_usage:
            out["usage"] = None
        return out


class ChatFormatter(Formatter):
    object_name = "chat.completion"
    chunk_object_name = "chat.completion.chunk"
    id_prefix = "chatcmpl"

    def chunk(self, delta: ChoiceDelta) -> list[str]:
        acc = self.choices[delta.index]
        first = not acc.started
        acc.started = True
        self.add(delta)
        events = []
        if first:
            role = {
                "index": delta.index,
                "delta": {"role": "assistant", "content": ""},
                "logprobs": None,
                "finish_reason": None,
            }
            events.append(sse(self._stream_envelope(role)))
        if delta.text or delta.logprobs or delta.finish_reason is not None:
            choice = {
                "index": delta.index,
                "delta": {"content": delta.text} if delta.text else {},
                "logprobs": self._logprobs(delta.logprobs) if self.logprobs else None,
                "finish_reason": delta.finish_reason,
            }
            if delta.finish_reason is not None:
                choice["stop_reason"] = delta.stop_reason
            events.append(sse(self._stream_envelope(choice)))
        return events

    def response(self) -> dict[str, Any]:
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": "".join(acc.text)},
                "logprobs": self._logprobs(acc.logprobs) if self.logprobs else None,
                "finish_reason": acc.finish_reason,
                "stop_reason": acc.stop_reason,
            }
            for i, acc in enumerate(self.choices)
        ]
        out = self._envelope(self.object_name, choices)
        out["usage"] = self.usage.to_dict()
        return out

    @staticmethod
    def _logprobs(entries: list[LogprobEntry] | tuple[LogprobEntry, ...]) -> dict[str, Any]:
        return {
            "content": [
                {
                    "token": e.token,
                    "logprob": e.logprob,
                    "bytes": list(e.token.encode("utf-8")),
                    "top_logprobs": [
                        {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}
                        for _, text, lp in e.top
                    ],
                }
                for e in entries
            ]
        }


class CompletionFormatter(Formatter):
    object_name = "text_completion"
    chunk_object_name = "text_completion"
    id_prefix = "cmpl"

    def __init__(self, *args: Any, echo_texts: list[str] | None = None, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.echo_texts = echo_texts  # per prompt, prepended to each of its choices

    def _echo(self, delta: ChoiceDelta, acc: _ChoiceAcc) -> str:
        if self.echo_texts is None or acc.started:
            return ""
        return self.echo_texts[delta.prompt_index]

    def chunk(self, delta: ChoiceDelta) -> list[str]:
        acc = self.choices[delta.index]
        echo = self._echo(delta, acc)
        acc.started = True
        logprobs = self._logprobs(acc, delta.logprobs) if self.logprobs else None
        self.add(delta)
        if not (echo or delta.text or delta.logprobs or delta.finish_reason is not None):
            return []
        choice = {
            "index": delta.index,
            "text": echo + delta.text,
            "logprobs": logprobs,
            "finish_reason": delta.finish_reason,
        }
        if delta.finish_reason is not None:
            choice["stop_reason"] = delta.stop_reason
        return [sse(self._stream_envelope(choice))]

    def collect(self, delta: ChoiceDelta) -> None:
        acc = self.choices[delta.index]
        echo = self._echo(delta, acc)
        acc.started = True
        if echo:
            acc.text.append(echo)
        self.add(delta)

    def response(self) -> dict[str, Any]:
        choices = []
        for i, acc in enumerate(self.choices):
            acc.text_offset = 0
            choices.append(
                {
                    "index": i,
                    "text": "".join(acc.text),
                    "logprobs": self._logprobs(acc, acc.logprobs) if self.logprobs else None,
                    "finish_reason": acc.finish_reason,
                    "stop_reason": acc.stop_reason,
                }
            )
        out = self._envelope(self.object_name, choices)
        out["usage"] = self.usage.to_dict()
        return out

    @staticmethod
    def _logprobs(acc: _ChoiceAcc, entries: list[LogprobEntry] | tuple[LogprobEntry, ...]) -> dict[str, Any]:
        offsets = []
        for e in entries:
            offsets.append(acc.text_offset)
            acc.text_offset += len(e.token)
        return {
            "tokens": [e.token for e in entries],
            "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{text: lp for _, text, lp in e.top} for e in entries],
            "text_offset": offsets,
        }
