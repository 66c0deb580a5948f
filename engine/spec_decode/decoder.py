"""SpecDecoder: the engine's speculative-decoding hook.

Each engine step with a spec decoder runs::

    propose()   running decode requests get draft tokens (``Request.spec_token_ids``); the policy
                decides how many (maybe none) from their acceptance rates and the step cost model
    schedule()  the scheduler gives such a request 1 + k query tokens (its last token + the drafts)
    execute()   one target forward; the runner returns the logits of all k + 1 rows
    verify()    per request: accepted drafts + one target token (see ``rejection.py``); rows of
                requests without drafts are sampled by the engine's sampler as usual
    update      (engine) tokens appended one by one with stop checks; KV of rejected positions is
                rolled back by lowering ``num_computed_tokens``; the blocks stay and are overwritten

Verification modes per request: greedy -> exact match with the argmax; sampling with n-gram drafts, or
a seeded request -> exact match with the request's own noise (the emitted tokens are those of
non-speculative decoding with that seed, whatever the batch or the number of drafts); unseeded
sampling with a draft model -> rejection sampling (best acceptance; same distribution).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from engine.request import Request, RequestStatus
from engine.runner import select_rows
from engine.sampling.sampler import greedy_argmax
from engine.scheduler import ScheduledBatch
from engine.spec_decode.draft import Draft
from engine.spec_decode.governor import SpecGovernor
from engine.spec_decode.metrics import SpecDecodeMetrics
from engine.spec_decode.policy import AdaptivePolicy, PolicyConfig
from engine.spec_decode.rejection import RejectionSampler, match_drafts


@dataclass(frozen=True)
class SpecConfig:
    method: str = "ngram"  # "ngram" | "draft"
    num_speculative_tokens: int = 8  # most draft tokens per request per step
    adaptive: bool = True  # per-request k and on/off from the cost model; False: always the most
    ngram_min: int = 2
    ngram_max: int = 4
    draft_model: str | None = None  # a model spec (engine.model_source); None: the target's own
    draft_seed: int = 0  # weights seed of a dummy draft model
    draft_num_blocks: int | None = None  # None: as many as the target's KV cache
    draft_catch_up_tokens: int = 256  # draft prefill per step for requests that arrived with KV
    policy: PolicyConfig = field(default_factory=PolicyConfig)

    def __post_init__(self) -> None:
        if self.method not in ("ngram", "draft"):
            raise ValueError(f"speculative method must be 'ngram' or 'draft', got {self.method!r}")
        if self.num_speculative_tokens < 1:
            raise ValueError(f"num_speculative_tokens must be >= 1, got {self.num_speculative_tokens}")
        if self.draft_catch_up_tokens < 1:
            raise ValueError("draft_catch_up_tokens must be >= 1")

    @property
    def policy_config(self) -> PolicyConfig:
        from dataclasses import replace

        return replace(self.policy, max_k=self.num_speculative_tokens, adaptive=self.adaptive)


class _RowView:
    """What the sampler sees for verification row ``j``: the request with drafts ``d_1..d_j`` appended
    to its output (penalties and the min_tokens mask depend on it). The generator is the request's."""

    __slots__ = ("req", "drafts", "_out")

    def __init__(self, req: Request, drafts: list[int]) -> None:
        self.req, self.drafts, self._out = req, drafts, None

    @property
    def request_id(self) -> str:
        return self.req.request_id

    @property
    def sampling(self):
        return self.req.sampling

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self.req.eos_token_ids

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.req.prompt_token_ids

    @property
    def output_token_ids(self) -> list[int]:
        if self._out is None:
            self._out = self.req.output_token_ids + self.drafts
        return self._out

    @property
    def all_token_ids(self) -> list[int]:
        return self.req.prompt_token_ids + self.output_token_ids

    @property
    def generator(self):
        return self.req.generator

    @generator.setter
    def generator(self, value) -> None:
        self.req.generator = value


Verified = tuple[list[int], list]  # emitted tokens, their logprobs (None entries when not asked)


class SpecDecoder:
    def __init__(
        self, proposer, config: SpecConfig | None = None, rejection: RejectionSampler | None = None
    ) -> None:
        self.proposer = proposer
        self.config = config or SpecConfig(method=proposer.name)
        self.policy = AdaptivePolicy(self.config.policy_config)
        self.governor = SpecGovernor()
        self._mode: tuple[int, bool] | None = None  # (running requests, speculating) of this step
        self.rejection = rejection or RejectionSampler()
        self.metrics = SpecDecodeMetrics()
        self.engine = None
        self._drafts: dict[str, Draft] = {}
        if proposer.needs_draft_model:
            proposer.on_forward = self.policy.observe_draft

    def bind(self, engine) -> None:
        """Attach to ``engine`` (done by ``LLMEngine``). The draft must share the target's vocabulary."""
        vocab = engine.config.model.vocab_size
        if self.proposer.needs_draft_model and self.proposer.vocab_size != vocab:
            raise ValueError(
                f"draft model vocabulary {self.proposer.vocab_size} != target vocabulary {vocab}"
            )
        self.engine = engine

    @property
    def sampler(self):
        return self.engine.runner.sampler  # read each time: tests may swap the runner's sampler

    def mode(self, req: Request) -> str:
        s = req.sampling
        if s.greedy:
            return "greedy"
        if s.seed is not None or not self.proposer.needs_draft_model:
            return "match"
        return "rejection"

    def forget(self, req: Request) -> None:
        """The request ended or was aborted: drop its proposer state (and draft KV blocks)."""
        self.proposer.forget(req.request_id)
        self.policy.forget(req.request_id)
        self._drafts.pop(req.request_id, None)

    # --- before scheduling -------------------------------------------------------------------
    def _speculates(self, sched) -> bool:
        """Whether this step may carry drafts (adaptive mode), decided before any proposing work.

        The governor measures decode-only steps, so only those explore: a step that will run prompt
        chunks (a running request still prefilling, or waiting requests the step may admit) follows
        the mode the governor has settled on for its batch-size class, and no mode before that."""
        n = len(sched.running)
        prefills = any(r.num_tokens - r.num_computed_tokens != 1 for r in sched.running) or (
            sched.waiting and n < sched.config.max_num_seqs
        )
        if prefills:
            return self.governor.preferred(n) is True
        speculating = self.governor.choose(n)
        self._mode = (n, speculating)
        return speculating

    def propose(self) -> None:
        eng = self.engine
        sched = eng.scheduler
        self._drafts.clear()
        self._mode = None
        for r in sched.running:
            r.spec_token_ids = []
        if not sched.running or (self.config.adaptive and not self._speculates(sched)):
            return
        cands: list[Request] = []
        caps: list[int] = []
        base_tokens = num_sampling = 0
        for r in sched.running:
            remaining = r.num_tokens - r.num_computed_tokens
            base_tokens += min(remaining, sched.chunk_cap)
            if remaining != 1 or r.status != RequestStatus.RUNNING:
                continue  # prefilling: nothing to verify yet
            num_sampling += 1
            room = min(r.sampling.max_tokens - len(r.output_token_ids), eng.max_model_len - r.num_tokens) - 1
            if room > 0:
                cands.append(r)
                caps.append(min(room, self.config.num_speculative_tokens))
        if not cands:
            return
        budget = sched.config.max_num_batched_tokens - base_tokens
        if sched.waiting:
            budget //= 2  # leave room to admit waiting requests
        graph_rows = getattr(eng.runner, "max_graph_rows", None)
        if graph_rows is not None and base_tokens < graph_rows:
            # A step that fits a CUDA graph costs about the same at any size; one row more, or
            # draft rows re-reading too much context, and it runs eagerly, several times slower
            # for a small model: drafts stay within the graph (runner._graph_bucket's rules).
            longest = max(r.num_tokens for r in cands)
            budget = min(budget, graph_rows - base_tokens, eng.runner.max_graph_extra_reads // (longest + 16))
        if not cands or budget <= 0:
            return
        ids = [r.request_id for r in cands]
        plan = dict(
            num_seqs=len(sched.running),
            base_tokens=base_tokens,
            num_sampling=num_sampling,
            token_budget=budget,
        )
        uses_draft = self.proposer.needs_draft_model
        ks = self.policy.plan(ids, caps, uses_draft_model=uses_draft, **plan)
        if not any(ks):
            return
        if uses_draft:
            items = [(r, k, self.mode(r)) for r, k in zip(cands, ks, strict=True) if k > 0]
            drafts = self.proposer.propose(items, self.sampler)
            for r, _, _ in items:
                d = drafts.get(r.request_id)
                if d is not None and d.tokens:
                    r.spec_token_ids = list(d.tokens)
                    self._drafts[r.request_id] = d
            return
        proposals = [self.proposer.propose(r, k) for r, k in zip(cands, ks, strict=True)]
        # The plan assumed every request could get its k; re-plan with what was actually proposed.
        ks = self.policy.plan(ids, [len(p) for p in proposals], uses_draft_model=False, **plan)
        for r, p, k in zip(cands, proposals, ks, strict=True):
            if k > 0:
                r.spec_token_ids = p[:k]
                self._drafts[r.request_id] = Draft(p[:k])

    # --- after the forward -------------------------------------------------------------------
    def verify(self, batch: ScheduledBatch, logits: torch.Tensor) -> dict[str, Verified]:
        """Tokens each sampling request of ``batch`` emits. ``logits`` holds every sampled row (a
        request owns ``num_logits_rows`` consecutive rows, in batch order). Call before the engine
        updates the requests."""
        results: dict[str, Verified] = {}
        plain_rows: list[int] = []
        plain: list[Request] = []
        spec: list[tuple[Request, int, list[int]]] = []
        row = 0
        for s in batch.requests:
            n = s.num_logits_rows
            if n == 1:
                plain_rows.append(row)
                plain.append(s.request)
            elif n > 1:
                spec.append((s.request, row, s.request.spec_token_ids[: n - 1]))
            row += n
        if plain:
            out = self.sampler(select_rows(logits, plain_rows), plain)
            for r, t, lp in zip(plain, out.token_ids, out.logprobs, strict=True):
                results[r.request_id] = ([t], [lp])
        if spec:
            self._verify_drafts(logits, spec, results)
        return results

    def _verify_drafts(self, logits: torch.Tensor, spec, results: dict[str, Verified]) -> None:
        sampler = self.sampler
        rows: list[int] = []
        views: list[_RowView] = []
        for req, r0, drafts in spec:
            for j in range(len(drafts) + 1):
                rows.append(r0 + j)
                views.append(_RowView(req, drafts[:j]))
        raw = select_rows(logits, rows)
        processed = sampler.processed_logits(raw, views)
        argmax = greedy_argmax(processed).tolist()
        rand = [i for i, v in enumerate(views) if not v.sampling.greedy]
        probs = sampler.probabilities(processed[rand], [views[i] for i in rand]) if rand else None
        prob_row = {v: i for i, v in enumerate(rand)}
        base = 0
        for req, _, drafts in spec:
            k = len(drafts)
            mode = self.mode(req)
            draft = self._drafts.get(req.request_id)
            if mode == "greedy":
                emitted = match_drafts(lambda j, b=base: argmax[b + j], drafts)
            elif mode == "rejection" and draft is not None and draft.probs is not None:
                p = probs[[prob_row[base + j] for j in range(k + 1)]]
                emitted = self.rejection(p, drafts, draft.probs[:k], sampler.generator(req))
            else:

                def sample(j: int, b: int = base, r: Request = req) -> int:
                    pj = probs[prob_row[b + j]]
                    return int((pj / sampler.noise(r, pj.shape[0], pj.device)).argmax())

                emitted = match_drafts(sample, drafts)
            results[req.request_id] = (emitted, self._logprobs(raw, base, emitted, req))
            self.metrics.record(k, len(emitted) - 1)
            self.policy.record(req.request_id, k, len(emitted) - 1)
            base += k + 1

    @staticmethod
    def _logprobs(raw: torch.Tensor, base: int, emitted: list[int], req: Request) -> list:
        """Per emitted token: (its logprob, top-n) of the raw logits, as the sampler reports them."""
        n = req.sampling.logprobs
        if n is None:
            return [None] * len(emitted)
        lp = torch.log_softmax(raw[base : base + len(emitted)].float(), dim=-1)
        top_v, top_i = lp.topk(max(n, 1), dim=-1)
        out = []
        for j, tok in enumerate(emitted):
            top = list(zip(top_i[j, :n].tolist(), top_v[j, :n].tolist(), strict=True)) if n else []
            out.append((lp[j, tok].item(), top))
        return out

    # --- measurements ------------------------------------------------------------------------
    def observe(
        self, num_seqs: int, num_tokens: int, num_verifying: int, only_sampling_rows: bool, seconds: float
    ) -> None:
        """A step's measured time. Steps with prefill chunks are left out of the cost model: their
        attention cost grows with context, not with the query tokens the policy trades."""
        if only_sampling_rows:
            self.policy.observe_step(num_seqs, num_tokens, num_verifying, seconds)

    def observe_outcome(self, tokens: int, seconds: float) -> None:
        """A decode-only step emitted ``tokens`` in ``seconds`` (proposing included): feeds the
        governor that keeps speculation only where it measurably pays."""
        if self._mode is None:
            return
        num_running, speculating = self._mode
        if speculating and not self._drafts:
            return  # nothing was proposed: the step says nothing about what drafts are worth
        self.governor.record(num_running, speculating, tokens, seconds)

    def check_integrity(self) -> None:
        check = getattr(self.proposer, "check_integrity", None)
        if check is not None:
            check()
