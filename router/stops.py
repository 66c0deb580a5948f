"""Stop strings, applied at the router on incrementally detokenized text.

The workers stop on token ids (EOS, ``stop_token_ids``); strings can span token boundaries, so they
are matched here on the text stream. Unless the stop string is to be included in the output, text
that might be the beginning of a stop string is held back until it is ruled out, so a client never
receives characters that a later match would have cut.
"""

from __future__ import annotations

from collections.abc import Sequence


class StopStringMatcher:
    """Feeds text deltas; returns what may be emitted and the stop string once one matched.

    Invariants: the emitted text is always a prefix of the final output; after a match every later
    ``push`` is ignored. Matches are only searched in text pushed while ``active`` (``min_tokens``:
    stop conditions do not apply before that many tokens), plus the overlap a match may span.
    """

    def __init__(self, stops: Sequence[str], include_stop_str_in_output: bool) -> None:
        self._stops = tuple(s for s in stops if s)
        self._include = include_stop_str_in_output
        self._max_len = max((len(s) for s in self._stops), default=0)
        self._text = ""
        self._emitted = 0
        self._search_floor = 0  # matches must end after this offset
        self.matched: str | None = None

    @property
    def text(self) -> str:
        """Everything emitted so far."""
        return self._text[: self._emitted]

    def push(self, delta: str, active: bool = True) -> str:
        """Add generated text; returns the newly emittable part. Check ``matched`` afterwards."""
        if self.matched is not None:
            return ""
        start = len(self._text)
        self._text += delta
        if not self._stops:
            return self._emit(len(self._text))
        if not active:
            self._search_floor = len(self._text)
            return self._emit(self._holdback_end())
        hit = self._find(max(0, start - self._max_len + 1))
        if hit is None:
            return self._emit(self._holdback_end())
        pos, stop = hit
        self.matched = stop
        end = pos + len(stop) if self._include else pos
        self._text = self._text[:end]
        return self._emit(end)

    def flush(self) -> str:
        """The held-back rest, when the sequence ended without a match."""
        return self._emit(len(self._text))

    def _find(self, search_from: int) -> tuple[int, str] | None:
        best: tuple[int, str] | None = None
        for stop in self._stops:
            pos = self._text.find(stop, search_from)
            while pos != -1 and pos + len(stop) <= self._search_floor:
                pos = self._text.find(stop, pos + 1)
            if pos != -1 and (best is None or pos < best[0]):
                best = (pos, stop)
        return best

    def _holdback_end(self) -> int:
        if self._include:
            return len(self._text)
        # Keep back the longest suffix that is a proper prefix of some stop string.
        for k in range(min(self._max_len - 1, len(self._text)), 0, -1):
            tail = self._text[-k:]
            if any(s.startswith(tail) for s in self._stops):
                return len(self._text) - k
        return len(self._text)

    def _emit(self, end: int) -> str:
        end = max(end, self._emitted)
        out = self._text[self._emitted : end]
        self._emitted = end
        return out
