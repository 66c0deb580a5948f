"""Prompt preparation shared by the HTTP and gRPC front ends: chat templating, tokenization, and the
per-choice ``GenerateRequest``s with their budgets. CPU-heavy steps run in a worker thread so a long
prompt never stalls the event loop."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import anyio
from jinja2 import TemplateError

from baton.text import ChatTemplateError
from router.backend import GenerateRequest, SamplingOptions
from router.errors import invalid
from router.generation import ChoiceSpec
from router.validation import resolve_max_tokens

log = logging.getLogger(__name__)


async def render_chat(
    tokenizer, messages: list[dict[str, Any]], add_generation_prompt: bool = True
) -> list[int]:
    """Chat template + tokenization (the template writes any BOS itself)."""
    try:
        text = await anyio.to_thread.run_sync(
            lambda: tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        )
    except (ChatTemplateError, TemplateError) as err:
        raise invalid(f"The chat template rejected the messages: {err}", "messages") from None
    except Exception as err:  # a template tripping over unexpected message fields: still the input's fault
        log.info("chat template failed", exc_info=True)
        raise invalid(
            f"The messages cannot be rendered with the chat template ({type(err).__name__}: {err}).",
            "messages",
        ) from None
    return await anyio.to_thread.run_sync(lambda: tokenizer.encode(text, add_special_tokens=False))


async def encode_texts(tokenizer, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
    return await anyio.to_thread.run_sync(
        lambda: [tokenizer.encode(t, add_special_tokens=add_special_tokens) for t in texts]
    )


def build_specs(
    prompts: Sequence[Sequence[int]],
    n: int,
    sampling: SamplingOptions,
    *,
    requested_max_tokens: int | None,
    max_tokens_param: str,
    max_model_len: int,
    default_max_tokens: int | None,
    request_id: str | None = None,
    trace_id: str | None = None,
) -> list[ChoiceSpec]:
    """``len(prompts) * n`` choices; choice ``p * n + j`` is sample ``j`` of prompt ``p``. With a seed,
    sample ``j`` uses ``seed + j`` so choices differ yet stay reproducible. Every choice carries the
    client request's ``trace_id`` (default: the generated base id)."""
    base_id = request_id or uuid.uuid4().hex
    specs = []
    for p_idx, prompt_ids in enumerate(prompts):
        max_tokens = resolve_max_tokens(
            len(prompt_ids),
            requested_max_tokens,
            max_tokens_param,
            max_model_len,
            default_max_tokens,
            sampling.min_tokens,
        )
        for j in range(n):
            seed = None if sampling.seed is None else _wrap_int64(sampling.seed + j)
            index = p_idx * n + j
            request = GenerateRequest(
                f"{base_id}-{index}",
                tuple(prompt_ids),
                replace(sampling, max_tokens=max_tokens, seed=seed),
                trace_id=trace_id or base_id,
            )
            specs.append(ChoiceSpec(index=index, prompt_index=p_idx, request=request))
    return specs


def _wrap_int64(value: int) -> int:
    """Keeps derived seeds valid int64 (the wire type) without changing in-range ones."""
    return (value + 2**63) % 2**64 - 2**63
