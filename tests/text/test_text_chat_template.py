"""Chat templates render like HF's and run sandboxed: a template is code shipped with a model."""

from __future__ import annotations

import re

import pytest
from jinja2.sandbox import SecurityError

from baton.text import ChatTemplateError, Tokenizer, render_chat_template


def test_smollm2_template(smollm2: Tokenizer) -> None:
    text = smollm2.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    assert text == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = smollm2.encode(text, add_special_tokens=False)
    assert ids[0] == smollm2.token_to_id("<|im_start|>") and ids.count(smollm2.eos_token_ids[0]) == 2


@pytest.mark.parametrize(
    "template",
    [
        "{{ ''.__class__.__mro__ }}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ messages.__class__ }}",
        "{{ raise_exception.__globals__ }}",
        "{% set x = messages.append(1) %}",  # the sandbox is immutable: no mutating inputs
        "{{ messages[0].update({'role': 'system'}) }}",
    ],
)
def test_template_escape_attempts_raise(template: str) -> None:
    with pytest.raises(SecurityError):
        render_chat_template(template, [{"role": "user", "content": "x"}])


def test_helpers_match_hf() -> None:
    template = (
        "{% for m in messages %}{% if m.role == 'tool' %}{% break %}{% endif %}{{ m.content | tojson }}|{% endfor %}"
        "{{ strftime_now('%Y') }}{% if add_generation_prompt %}>{% endif %}"
    )
    messages = [{"role": "user", "content": 'héllo "q"'}, {"role": "tool", "content": "x"}]
    out = render_chat_template(template, messages, add_generation_prompt=True)
    assert re.fullmatch(r'"héllo \\"q\\""\|\d{4}>', out), out
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        render_chat_template("{{ raise_exception('roles must alternate') }}", messages)


def test_trim_blocks_like_hf() -> None:
    template = "{% for m in messages %}\n  {% if true %}\n{{ m.content }}\n  {% endif %}\n{% endfor %}"
    assert (
        render_chat_template(template, [{"role": "u", "content": "a"}, {"role": "u", "content": "b"}])
        == "a\nb\n"
    )
