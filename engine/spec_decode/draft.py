"""Draft-model proposer: a smaller model with the same vocabulary, over its own paged KV cache.

The draft keeps a *shadow* request per target request: its own block table in the draft's KV cache
(``KVCacheManager`` without prefix caching, so no block holding a rejected draft is ever published)
and its own ``num_computed_tokens``. Before each proposal the shadow is synchronised with the target:
draft tokens the target accepted keep their KV, the rest is rolled back (``num_computed_tokens``
lowered; the blocks stay allocated and are overwritten). Then one batched draft forward catches every
proposing shadow up to the target's last token and samples the first draft token; ``k - 1`` one-token
forwards sample the others.

Catching up is how the draft gets the prompt's KV on a decode worker whose target KV came from a
prefill worker: the first proposal after the KV lands prefills the prompt on the (small) draft model
here, at most ``catch_up_tokens`` tokens per step so the running batch is not stalled by one long
prompt (requests still catching up decode without drafts meanwhile).

Draft tokens are drawn per the request's verification mode: ``greedy`` takes the draft's argmax;
``match`` draws with the request's own upcoming noise vectors (peeked, not consumed) so the draft and
the target make the same choice when their distributions agree; ``rejection`` samples the draft's
distribution with a generator of its own and returns those distributions for rejection sampling.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from engine.request import Request, RequestStatus
from engine.sampling.sampler import Sampler
from engine.scheduler import ScheduledBatch, ScheduledRequest
from engine.spec_decode.rejection import sample_from

_DRAFT_SEED_SALT = 0x5DEECE66D  # the draft's generator differs from (but follows from) the request's


@dataclass
class Draft:
    tokens: list[int]
    probs: torch.Tensor | None = None  # [k, V]: distributions the tokens were drawn from (rejection mode)


class _Shadow:
    __slots__ = ("req", "synced", "generator")

    def __init__(self, req: Request, synced: int) -> None:
        self.req = req
        self.synced = synced  # the first ``synced`` tokens of ``req`` equal the target's
        self.generator: torch.Generator | None = None


class DraftModelProposer:
    name = "draft"
    needs_draft_model = True

    def __init__(
        self,
        draft_engine,
        catch_up_tokens: int = 256,
        on_forward: Callable[[int, float], None] | None = None,
    ) -> None:
        """``draft_engine``: an ``LLMEngine`` of the draft model built with prefix caching off; only its
        model, KV cache tensor, attention backend and block manager are used."""
        if draft_engine.kv.enable_prefix_caching:
            raise ValueError("the draft model's KV cache must not use prefix caching")
        self.runner = draft_engine.runner
        self.kv = draft_engine.kv
        self.vocab_size = draft_engine.config.model.vocab_size
        self.catch_up_tokens = catch_up_tokens
        self.on_forward = on_forward  # (rows, seconds) of every draft forward, for the cost model
        self._shadows: dict[str, _Shadow] = {}

    # --- bookkeeping -------------------------------------------------------------------------
    def forget(self, request_id: str) -> None:
        sh = self._shadows.pop(request_id, None)
        if sh is not None:
            self.kv.free(sh.req)

    def __len__(self) -> int:
        return len(self._shadows)

    def check_integrity(self) -> None:
        self.kv.check_integrity()

    def _sync(self, target: Request) -> _Shadow:
        tokens = target.all_token_ids
        sh = self._shadows.get(target.request_id)
        if sh is None:
            shadow = Request(target.request_id, tokens, target.sampling, status=RequestStatus.RUNNING)
            sh = self._shadows[target.request_id] = _Shadow(shadow, len(tokens))
            return sh
        r = sh.req
        computed = r.num_computed_tokens
        if computed > sh.synced:  # KV of draft tokens: valid up to the first one the target rejected
            drafts, known = r.output_token_ids, tokens[sh.synced : computed]
            m = 0
            while m < len(known) and m < len(drafts) and known[m] == drafts[m]:
                m += 1
            computed = sh.synced + m
        r.prompt_token_ids, r.output_token_ids = tokens, []
        r.num_computed_tokens = min(computed, len(tokens) - 1)
        sh.synced = len(tokens)
        return sh

    # --- proposing ---------------------------------------------------------------------------
    @torch.inference_mode()
    def propose(self, items: list[tuple[Request, int, str]], sampler: Sampler) -> dict[str, Draft]:
        """Draft tokens for ``(target request, k, mode)`` items. A request may get none (still catching
        up, or no room in the draft cache)."""
        budget = self.catch_up_tokens
        free_need = 1 + max((k for _, k, _ in items), default=0)  # a normal step's catch-up
        step0: list[tuple[_Shadow, int]] = []
        active: list[tuple[Request, _Shadow, int, str]] = []
        for target, k, mode in items:
            sh = self._sync(target)
            need = sh.req.num_tokens - sh.req.num_computed_tokens
            if need <= free_need or need <= budget:
                budget -= max(0, need - free_need)
                n, full = need, True
            else:  # catch up a chunk now, draft later
                n, full = min(budget, need - 1), False
                budget -= n
                if n <= 0:
                    continue
            if not self.kv.allocate_slots(sh.req, n + (k - 1 if full else 0)):
                self.forget(target.request_id)  # the draft cache is full: this request decodes plainly
                continue
            step0.append((sh, n))
            if full:
                active.append((target, sh, k, mode))
        if not step0:
            return {}
        noise = {t.request_id: self._peek_noise(t, k, sampler) for t, _, k, m in active if m == "match"}
        out = {t.request_id: Draft([], [] if m == "rejection" else None) for t, _, _, m in active}
        logits = self._forward(step0)
        for j in range(max((k for _, _, k, _ in active), default=0)):
            if j > 0:
                active = [a for a in active if a[2] > j]
                logits = self._forward([(sh, 1) for _, sh, _, _ in active])
            self._sample(logits, active, j, noise, out, sampler)
        for d in out.values():
            if d.probs is not None:
                d.probs = torch.stack(d.probs)
        return out

    def _forward(self, work: list[tuple[_Shadow, int]]) -> torch.Tensor:
        """Run ``n`` more tokens of each shadow; logits of the shadows that reached their end."""
        t0 = time.perf_counter()
        runner = self.runner
        batch = ScheduledBatch(tuple(ScheduledRequest(sh.req, n) for sh, n in work))
        inputs = runner.prepare(batch)
        hidden = runner.model(inputs.input_ids, inputs.positions, runner.kv_cache, inputs.meta, runner.attn)
        logits = runner.model.compute_logits(hidden[inputs.logits_rows])
        for sh, n in work:
            sh.req.num_computed_tokens += n
        if self.on_forward is not None:
            self.on_forward(batch.num_tokens, time.perf_counter() - t0)
        return logits

    def _sample(self, logits, active, j: int, noise: dict, out: dict[str, Draft], sampler: Sampler) -> None:
        """Draw draft token ``j`` of every active request (row ``i`` of ``logits`` is ``active[i]``)."""
        rand = [i for i, (t, _, _, mode) in enumerate(active) if mode != "greedy"]
        tokens = logits.argmax(dim=-1).tolist()
        if rand:
            probs = sampler.probabilities(logits[rand], [active[i][0] for i in rand])
            for row, i in enumerate(rand):
                target, sh, _, mode = active[i]
                if mode == "match":
                    tokens[i] = int((probs[row] / noise[target.request_id][j].to(probs.device)).argmax())
                else:
                    tokens[i] = sample_from(probs[row], self._generator(sh, target, sampler))
                    out[target.request_id].probs.append(probs[row])
        for i, (target, sh, _, _) in enumerate(active):
            out[target.request_id].tokens.append(tokens[i])
            sh.req.output_token_ids.append(tokens[i])

    def _peek_noise(self, target: Request, k: int, sampler: Sampler) -> list[torch.Tensor]:
        """The next ``k`` noise vectors the target's sampler will draw for ``target``, left undrawn
        (the generator's state is restored), so the verifier draws exactly these again."""
        gen = sampler.generator(target)
        state = gen.get_state()
        draws = [torch.empty(self.vocab_size).exponential_(generator=gen) for _ in range(k)]
        gen.set_state(state)
        return draws

    def _generator(self, sh: _Shadow, target: Request, sampler: Sampler) -> torch.Generator:
        if sh.generator is None:
            seed = sampler.generator(target).initial_seed() ^ _DRAFT_SEED_SALT
            sh.generator = torch.Generator().manual_seed(seed)
        return sh.generator
