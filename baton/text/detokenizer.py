"""Streaming detokenization: token ids in, text deltas out.

Decoding one token at a time is wrong in two ways: a multi-byte UTF-8 character can span tokens (a lone
piece decodes to U+FFFD), and SentencePiece-style decoders drop the leading space of the first token
they see. Both strategies here decode a short window that starts a few tokens back, emit only the text
past what that window's prefix already produced, and hold text back while it ends in an incomplete
character. Invariant: the concatenation of every ``push`` result plus ``flush()`` equals decoding the
whole generated sequence (after the prompt) at once, whenever byte tokens form valid UTF-8. (A run of
byte-fallback tokens that is not valid UTF-8 has no single rendering: decoded whole it gives one U+FFFD
per byte, decoded in windows a lone ASCII byte shows as itself. Text after such a run is exact.)
"""

from __future__ import annotations

from collections.abc import Sequence

from baton.text.tokenizer import Tokenizer

try:
    from tokenizers.decoders import DecodeStream
except ImportError:  # tokenizers < 0.21
    DecodeStream = None

_REPLACEMENT = "\ufffd"
_PROMPT_CONTEXT = 6  # tokens of the prompt kept as left context (enough for a space or a split char)


class IncrementalDetokenizer:
    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_ids: Sequence[int] = (),
        skip_special_tokens: bool = True,
        use_decode_stream: bool | None = None,
    ) -> None:
        """``use_decode_stream``: None picks ``tokenizers.DecodeStream`` when available (Rust, fast),
        False forces the pure-Python prefix-offset algorithm."""
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = list(prompt_ids[-_PROMPT_CONTEXT:])
        # [prefix_offset, read_offset): tokens whose text was already emitted, kept as left context.
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._stream = None
        if use_decode_stream is not False and DecodeStream is not None:
            try:
                self._stream = DecodeStream(ids=list(self._ids), skip_special_tokens=skip_special_tokens)
            except TypeError:  # tokenizers without prompt prefill: only usable with no prompt
                if not self._ids:
                    self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        if use_decode_stream and self._stream is None:
            raise RuntimeError("tokenizers.DecodeStream is not available in this tokenizers version")

    def push(self, token_id: int) -> str:
        """Text newly completed by ``token_id`` ("" while a character is still incomplete)."""
        self._ids.append(token_id)
        if self._stream is not None:
            try:
                text = self._stream.step(self._tok.backend, token_id)
            except Exception:  # its Rust errors surface as bare Exception
                # DecodeStream gives up on some byte-fallback garbage ("invalid prefix"). Our offsets
                # mirror its state, so the Python path takes over from here.
                self._stream = None
            else:
                if text is None:
                    return ""
                self._mark_emitted()
                return text
        prefix_text = self._tok.decode(self._ids[self._prefix_offset : self._read_offset], self._skip)
        full_text = self._tok.decode(self._ids[self._prefix_offset :], self._skip)
        if len(full_text) <= len(prefix_text) or full_text.endswith(_REPLACEMENT):
            return ""  # nothing new yet, or a character split across tokens: wait for the rest
        self._mark_emitted()
        return full_text[len(prefix_text) :]

    def flush(self) -> str:
        """At the end of the stream: whatever is still held back (an incomplete character decodes as U+FFFD)."""
        prefix_text = self._tok.decode(self._ids[self._prefix_offset : self._read_offset], self._skip)
        full_text = self._tok.decode(self._ids[self._prefix_offset :], self._skip)
        self._mark_emitted()
        return full_text[len(prefix_text) :]

    def _mark_emitted(self) -> None:
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        # Keep the token list short: only the left context of the next window is ever decoded.
        if self._prefix_offset > 64:
            drop = self._prefix_offset
            del self._ids[:drop]
            self._prefix_offset -= drop
            self._read_offset -= drop
