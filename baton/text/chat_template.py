"""Chat templates rendered in a sandbox.

A chat template is Jinja code shipped with a model, so it is untrusted input: it renders inside
``ImmutableSandboxedEnvironment`` (no attribute access to dunders/internals, no mutation of lists and
dicts passed in), and any unsafe access raises ``SecurityError`` instead of quietly rendering nothing.
The helpers match what HF transformers gives templates (``raise_exception``, ``strftime_now``, a
``tojson`` that keeps non-ASCII text), so published templates render the same here.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any, NoReturn

from jinja2 import Template
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError


class ChatTemplateError(ValueError):
    """The template refused the conversation (its own ``raise_exception``), e.g. roles out of order."""


def _raise_exception(message: str) -> NoReturn:
    raise ChatTemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(
    value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys=False
) -> str:
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


class _ChatSandbox(ImmutableSandboxedEnvironment):
    def unsafe_undefined(self, obj: Any, attribute: str) -> NoReturn:  # type: ignore[override]
        # The base class returns an Undefined that renders as "" when printed; fail loudly instead.
        raise SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe")


@lru_cache(maxsize=1)
def _environment() -> _ChatSandbox:
    env = _ChatSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


@lru_cache(maxsize=16)
def compile_chat_template(source: str) -> Template:
    """Parse once; templates are reused for every request."""
    return _environment().from_string(source)


def render_chat_template(
    source: str, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True, **variables: Any
) -> str:
    """Render ``messages`` (OpenAI-style dicts) with template ``source``; extra ``variables`` (e.g.
    ``bos_token``, ``tools``) are visible to the template."""
    return compile_chat_template(source).render(
        messages=messages, add_generation_prompt=add_generation_prompt, **variables
    )
