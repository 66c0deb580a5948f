"""Batched sampler: one call per step for every sequence that needs a token.

Order of operations per row (vLLM semantics): logprobs of the raw logits are reported; then
penalties (repetition on prompt+output, presence/frequency on output), logit bias and the min_tokens
mask are applied; greedy rows take argmax, the rest are scaled by temperature, filtered by top-k,
top-p and min-p, and sampled with the exponential-race trick using the request's own generator —
so a seeded request draws the same tokens whatever else is in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.request import Request

Logprobs = tuple[float, list[tuple[int, float]]]  # (sampled token's logprob, top-k [(id, logprob)])


@dataclass(frozen=True)
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[Logprobs | None]


class Sampler:
    def __init__(self, seed: int = 0) -> None:
        self._seeder = torch.Generator().manual_seed(seed)

    def __call__(self, logits: torch.Tensor, reqs: list[Request]) -> SamplerOutput:
        """``logits``: fp32 [N, V], row i belongs to ``reqs[i]``."""
        raw = logits
        logits = self._process(logits, reqs)
        tokens = self._sample(logits, reqs)
        logprobs: list[Logprobs | None] = [None] * len(reqs)
        want = [i for i, r in enumerate(reqs) if r.sampling.logprobs is not None]
        if want:
            lp = torch.log_softmax(raw[want].float(), dim=-1)
            k = max(reqs[i].sampling.logprobs for i in want)
            top_v, top_i = lp.topk(max(k, 1), dim=-1) if k > 0 else (None, None)
            for j, i in enumerate(want):
                n = reqs[i].sampling.logprobs
                top = list(zip(top_i[j, :n].tolist(), top_v[j, :n].tolist(), strict=True)) if n else []
                logprobs[i] = (lp[j, tokens[i]].item(), top)
        return SamplerOutput(tokens, logprobs)

    # --- logits processing -----------------------------------------------------------------
    def _process(self, logits: torch.Tensor, reqs: list[Request]) -> torch.Tensor:
        needs = [
            i
            for i, r in enumerate(reqs)
            if r.sampling.needs_penalties
            or r.sampling.logit_bias
            or len(r.output_token_ids) < r.sampling.min_tokens
        ]
        if not needs:
            return logits
        logits = logits.clone()
        for i in needs:
            r, s, row = reqs[i], reqs[i].sampling, logits[i]
            if s.repetition_penalty != 1.0:
                seen = torch.tensor(sorted(set(r.all_token_ids)), dtype=torch.long, device=row.device)
                vals = row[seen]
                row[seen] = torch.where(vals > 0, vals / s.repetition_penalty, vals * s.repetition_penalty)
            if (s.presence_penalty or s.frequency_penalty) and r.output_token_ids:
                out = torch.tensor(r.output_token_ids, dtype=torch.long, device=row.device)
                counts = torch.bincount(out, minlength=row.shape[0]).to(row.dtype)
                row -= s.frequency_penalty * counts + s.presence_penalty * (counts > 0).to(row.dtype)
            for tok, bias in s.logit_bias:
                row[tok] += bias
            if len(r.output_token_ids) < s.min_tokens:
                banned = set(s.stop_token_ids) | (set() if s.ignore_eos else set(r.eos_token_ids))
                if banned:
                    row[list(banned)] = float("-inf")
        return logits

    # --- token choice ----------------------------------------------------------------------
    def _sample(self, logits: torch.Tensor, reqs: list[Request]) -> list[int]:
        tokens = greedy_argmax(logits)
        rand = [i for i, r in enumerate(reqs) if not r.sampling.greedy]
        if rand:
            probs = self.probabilities(logits[rand], [reqs[i] for i in rand])
            noise = torch.stack([self.noise(reqs[i], probs.shape[1], probs.device) for i in rand])
            tokens[rand] = (probs / noise).argmax(dim=-1)
        return tokens.tolist()

    # --- pieces shared with speculative verification (engine/spec_decode) -----------------------
    def processed_logits(self, logits: torch.Tensor, reqs: list) -> torch.Tensor:
        """Penalties, logit bias and the min_tokens mask applied (row i by ``reqs[i]``)."""
        return self._process(logits, reqs)

    def probabilities(self, logits: torch.Tensor, reqs: list) -> torch.Tensor:
        """The distribution a non-greedy row is sampled from: temperature, then top-k/top-p/min-p."""
        x = logits.float()
        temps = torch.tensor([r.sampling.temperature for r in reqs], device=x.device)
        x = self._filter(x / temps[:, None], reqs)
        return torch.softmax(x, dim=-1)

    def generator(self, req) -> torch.Generator:
        """The request's own generator (from its seed, else from this sampler's seeder), made once."""
        if req.generator is None:
            seed = req.sampling.seed
            if seed is None:
                seed = int(torch.randint(0, 2**62, (1,), generator=self._seeder).item())
            req.generator = torch.Generator().manual_seed(seed)
        return req.generator

    def noise(self, req, n: int, device: torch.device) -> torch.Tensor:
        """The request's next exponential-race noise vector (one per sampled token)."""
        return self._exponential(req, n, device)

    def _filter(self, x: torch.Tensor, reqs: list[Request]) -> torch.Tensor:
        top_k = torch.tensor(
            [r.sampling.top_k if r.sampling.top_k > 0 else x.shape[1] for r in reqs], device=x.device
        )
        top_p = torch.tensor([r.sampling.top_p for r in reqs], device=x.device)
        min_p = torch.tensor([r.sampling.min_p for r in reqs], device=x.device)
        if bool((top_k >= x.shape[1]).all() and (top_p >= 1).all() and (min_p <= 0).all()):
            return x
        sorted_x, order = x.sort(dim=-1, descending=True)
        ranks = torch.arange(x.shape[1], device=x.device)[None, :]
        drop = ranks >= top_k[:, None]
        probs = torch.softmax(sorted_x, dim=-1)
        # top-p: drop a token when the mass strictly before it already reaches p (the top token survives).
        drop |= (probs.cumsum(dim=-1) - probs) >= top_p[:, None]
        drop |= probs < (min_p[:, None] * probs[:, :1])
        sorted_x = sorted_x.masked_fill(drop, float("-inf"))
        return torch.empty_like(x).scatter_(1, order, sorted_x)

    def _exponential(self, req: Request, n: int, device: torch.device) -> torch.Tensor:
        # Drawn on the CPU from the request's own generator, so it is reproducible on any device.
        return torch.empty(n).exponential_(generator=self.generator(req)).to(device)


def greedy_argmax(logits: torch.Tensor) -> torch.Tensor:
    """``logits.argmax(dim=-1)`` (first maximum of each row), computed in two levels on CPU.

    CPU ``argmax`` over a long row is several times slower than ``amax``: take the maximum of each
    chunk of ``_CHUNK`` values, the first chunk holding the row's maximum, then the first maximum
    inside it. Same result as ``argmax``, ties and NaNs included (both levels take the first).
    """
    rows, vocab = logits.shape
    if logits.device.type != "cpu" or vocab % _CHUNK or vocab < 4 * _CHUNK:
        return logits.argmax(dim=-1)
    chunks = logits.view(rows, vocab // _CHUNK, _CHUNK)
    best_chunk = chunks.amax(dim=-1).argmax(dim=-1)  # [rows]
    inside = chunks[torch.arange(rows, device=logits.device), best_chunk].argmax(dim=-1)
    return best_chunk * _CHUNK + inside


_CHUNK = 256
