"""N-gram (prompt lookup) proposer: no extra model.

The context's last ``n`` tokens (``n`` from ``max_n`` down to ``min_n``) are looked up among the
earlier n-grams of the same request (prompt and output); the tokens that followed the latest earlier
occurrence are proposed. The copy may run into the tokens it is itself proposing (an overlapping copy,
as in LZ77), so a loop of period ``p`` proposes a full ``k`` tokens rather than stopping after ``p``.

Per request the proposer keeps one dictionary per ``n``: n-gram -> end position of its latest
occurrence, extended incrementally with new tokens (positions ``<= L - 2``, so the suffix itself,
ending at ``L - 1``, finds only earlier occurrences). Lookups are O(max_n) per step.
"""

from __future__ import annotations

from engine.request import Request

_BULK = 16  # new positions from which indexing takes the bulk path


class _Index:
    __slots__ = ("tokens", "tables", "indexed")

    def __init__(self, min_n: int, max_n: int) -> None:
        self.tokens: list[int] = []
        self.tables: dict[int, dict[tuple[int, ...], int]] = {n: {} for n in range(min_n, max_n + 1)}
        self.indexed = 0  # n-grams ending at positions < indexed are in the tables

    def extend(self, req: Request) -> None:
        have, prompt, out = len(self.tokens), req.prompt_token_ids, req.output_token_ids
        if have < len(prompt):
            self.tokens.extend(prompt[have:])
            have = len(prompt)
        self.tokens.extend(out[have - len(prompt) :])
        toks = self.tokens
        hi = len(toks) - 2  # the last end position indexed (the suffix itself is looked up, not stored)
        for n, table in self.tables.items():
            lo = max(self.indexed, n - 1)
            if hi - lo < _BULK:  # a few new tokens (a decode step): plain inserts
                for end in range(lo, hi + 1):
                    table[tuple(toks[end + 1 - n : end + 1])] = end
                continue
            # Many (a prompt on its first lookup): the n-grams ending at lo..hi as tuples of n shifted
            # slices, inserted in order so the latest occurrence wins, in one C-level pass.
            grams = zip(*(toks[lo - n + 1 + j : hi + 2 - n + j] for j in range(n)), strict=True)
            table.update(zip(grams, range(lo, hi + 1), strict=True))
        self.indexed = max(self.indexed, hi + 1)


class NgramProposer:
    name = "ngram"
    needs_draft_model = False

    def __init__(self, min_n: int = 2, max_n: int = 4) -> None:
        if not 1 <= min_n <= max_n:
            raise ValueError(f"n-gram sizes must satisfy 1 <= min_n <= max_n, got {min_n}, {max_n}")
        self.min_n, self.max_n = min_n, max_n
        self._index: dict[str, _Index] = {}

    def propose(self, req: Request, k: int) -> list[int]:
        """Up to ``k`` tokens continuing ``req``'s known tokens (empty when no n-gram matches)."""
        if k <= 0:
            return []
        idx = self._index.get(req.request_id)
        if idx is None:
            idx = self._index[req.request_id] = _Index(self.min_n, self.max_n)
        idx.extend(req)
        toks = idx.tokens
        length = len(toks)
        for n in range(min(self.max_n, length - 1), self.min_n - 1, -1):
            end = idx.tables[n].get(tuple(toks[length - n :]))
            if end is None:
                continue
            out: list[int] = []
            for i in range(k):
                pos = end + 1 + i
                out.append(toks[pos] if pos < length else out[pos - length])
            return out
        return []

    def forget(self, request_id: str) -> None:
        self._index.pop(request_id, None)

    def __len__(self) -> int:
        return len(self._index)
