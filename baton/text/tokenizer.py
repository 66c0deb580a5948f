"""A fast (Rust ``tokenizers``) tokenizer plus the bits of ``tokenizer_config.json`` serving needs.

Reads an HF tokenizer folder: ``tokenizer.json`` (required), ``tokenizer_config.json`` (special tokens,
``add_bos_token``, ``chat_template``), and, when present, ``chat_template.jinja``,
``generation_config.json`` / ``config.json`` (extra end-of-sequence ids, e.g. Llama-3's ``<|eot_id|>``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tokenizers import AddedToken
from tokenizers import Tokenizer as _Backend

from baton.text.chat_template import render_chat_template


def _token_content(value: Any) -> str | None:
    # Special tokens are saved either as a string or as a serialized AddedToken {"content": ...}.
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _pick_template(value: Any) -> str | None:
    # Older configs store several named templates as [{"name": ..., "template": ...}].
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        return named.get("default") or next(iter(named.values()), None)
    return value if isinstance(value, str) else None


class Tokenizer:
    """Invariant: ``eos_token_ids`` is non-empty when the folder names any end token; ids are stable."""

    def __init__(
        self,
        backend: _Backend,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        add_bos_token: bool = False,
        chat_template: str | None = None,
        extra_eos_token_ids: Sequence[int] = (),
    ) -> None:
        self.backend = backend
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.bos_token_id = backend.token_to_id(bos_token) if bos_token else None
        self.add_bos_token = add_bos_token and self.bos_token_id is not None
        self.chat_template = chat_template
        eos = [backend.token_to_id(eos_token)] if eos_token else []
        self.eos_token_ids: tuple[int, ...] = tuple(
            dict.fromkeys(i for i in [*eos, *extra_eos_token_ids] if i is not None)
        )

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        folder = Path(path)
        if not (folder / "tokenizer.json").is_file():
            raise ValueError(f"{folder}: no tokenizer.json")
        config = _read_json(folder / "tokenizer_config.json")
        template = _pick_template(config.get("chat_template"))
        jinja_file = folder / "chat_template.jinja"
        if template is None and jinja_file.is_file():
            template = jinja_file.read_text(encoding="utf-8")
        extra_eos: list[int] = []
        for name in ("generation_config.json", "config.json"):
            value = _read_json(folder / name).get("eos_token_id")
            extra_eos += value if isinstance(value, list) else [value] if isinstance(value, int) else []
        return cls(
            _Backend.from_file(str(folder / "tokenizer.json")),
            bos_token=_token_content(config.get("bos_token")),
            eos_token=_token_content(config.get("eos_token")),
            add_bos_token=bool(config.get("add_bos_token", False)),
            chat_template=template,
            extra_eos_token_ids=extra_eos,
        )

    @property
    def vocab_size(self) -> int:
        """Number of token ids the tokenizer can produce (added tokens included)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def cover_ids(self, vocab_size: int) -> None:
        """Give every id below ``vocab_size`` a text: ids past this tokenizer's own vocabulary decode
        as `` <id>``. For dummy weights driven by another model's tokenizer (a Llama-3.1-8B shape samples
        from 128,256 ids; the default tokenizer knows 49,152): without it the ids it lacks decode to
        nothing, streams skip them, and a client sees several tokens arrive as one, which distorts
        inter-token latency. Ids already covered keep their text."""
        have = self.vocab_size
        if vocab_size > have:
            self.backend.add_tokens(
                [AddedToken(f" <{i}>", normalized=False, special=False) for i in range(have, vocab_size)]
            )

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        # encode_batch lets go of the GIL while it works; encode holds it throughout, so an
        # 8,000-token prompt would freeze every other thread of the process (a router's event loop
        # and every token stream it relays) for tens of milliseconds.
        ids = self.backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
        # Some tokenizer.json files leave BOS to the config flag rather than their post-processor.
        if add_special_tokens and self.add_bos_token and (not ids or ids[0] != self.bos_token_id):
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **variables: Any
    ) -> str:
        """Render the model's chat template (sandboxed). The result already holds any BOS the template
        writes, so encode it with ``add_special_tokens=False``."""
        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat template")
        return render_chat_template(
            self.chat_template,
            messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
            **variables,
        )
