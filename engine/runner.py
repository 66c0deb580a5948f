"""ModelRunner: turns a ScheduledBatch into tensors, runs the model, samples. Returns a StepOutput.

It owns the model, the KV cache tensor and the attention backend, and nothing about policy.

On CUDA with the Triton attention backend the runner switches the model to the fused Triton ops
(once, here) and replays steps of short queries from CUDA graphs (``engine/cuda_graphs.py``):
decodes, draft verifications (1 + k tokens) and tiny prefill chunks. A graph runs one query row
per token; a request's ``n`` tokens become ``n`` rows at consecutive positions sharing its block
table, row ``j`` attending to the first ``start + j + 1`` positions. That is exact causal attention:
every row's K/V is written before any row of the layer attends. Other steps (long prefill chunks,
batches above the largest bucket) run eagerly. Either way a step's integer inputs travel to the
device in one copy from a pinned buffer.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from engine.attention.base import AttentionBackend, AttentionMetadata
from engine.cuda_graphs import FED_MAX_BATCH, DecodeGraphs, PinnedStaging, graph_batch_sizes
from engine.gemv_dispatch import GemvDispatch, install_gemv
from engine.models.cpu_forward import cpu_forward
from engine.models.layers import TorchOps
from engine.models.llama import LlamaForCausalLM
from engine.request import Request
from engine.sampling.sampler import Logprobs, Sampler
from engine.scheduler import ScheduledBatch

# Graphs of every bucket up to this many rows are captured when the engine is built.
DEFAULT_MAX_GRAPH_BATCH = 256
# Steps the host may launch beyond the one the device is running (overlap without a backlog).
MAX_STEPS_AHEAD = 1
# Most query tokens of one request in a graph step: decodes and verifications of up to 15 drafts.
MAX_GRAPH_QUERY_LEN = 16
# A graph row re-reads its request's whole context, so a request's extra rows cost extra KV reads;
# past this many bytes (about 1.4 ms of HBM bandwidth, the order of an eager step's launch
# overhead) the step runs eagerly, where the prefill kernel reads each context once.
MAX_GRAPH_EXTRA_KV_BYTES = 4 << 30


@dataclass(frozen=True)
class StepOutput:
    """Tokens sampled this step, keyed by request id (only requests whose step reached the end)."""

    sampled: dict[str, int]
    logprobs: dict[str, Logprobs | None]
    # Steps that verify draft tokens sample nothing here: the logits of every sampled row (a request
    # owns ``ScheduledRequest.num_logits_rows`` consecutive rows, in batch order) go to the verifier.
    logits: torch.Tensor | None = None


@dataclass
class Lookahead:
    """A decode step launched before the step it follows had its tokens on the host (see
    ``ModelRunner.execute``): for these requests, at these positions, fed these tokens."""

    request_ids: tuple[str, ...]
    positions: tuple[int, ...]  # each request's num_computed_tokens when the step runs
    logits: torch.Tensor  # [n, V], valid until the next graph replay
    tokens: tuple[int, ...] = ()  # the fed token ids, once read back


@dataclass(frozen=True)
class BatchInputs:
    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    logits_rows: torch.Tensor  # rows of the flattened step whose logits are sampled
    sampled_requests: tuple[Request, ...]


def select_rows(logits: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """``logits[rows]`` without a blocking host->device copy of the index: a run of consecutive
    rows is a slice, anything else an index uploaded from pinned memory asynchronously (a pageable
    or list index is copied synchronously, which waits for the forward still running on a GPU)."""
    if rows and rows == list(range(rows[0], rows[0] + len(rows))):
        return logits[rows[0] : rows[0] + len(rows)]
    index = torch.tensor(rows, dtype=torch.long)
    if logits.device.type == "cuda":
        index = index.pin_memory().to(logits.device, non_blocking=True)
    return logits.index_select(0, index)


def _tokens(r: Request, start: int, n: int) -> list[int]:
    """Known tokens ``[start, start + n)`` of ``r`` without concatenating prompt and output."""
    if start + n > r.num_tokens:  # a verification step: the draft tokens follow the known ones
        return (r.all_token_ids + r.spec_token_ids)[start : start + n]
    prompt = r.prompt_token_ids
    if start + n <= len(prompt):
        return prompt[start : start + n]
    if start >= len(prompt):
        return r.output_token_ids[start - len(prompt) : start - len(prompt) + n]
    return r.all_token_ids[start : start + n]


# Segment starts of a step's int32 input buffer are multiples of this many elements (16 bytes; int64
# copies of the first segments stay 16-byte aligned too), table widths multiples of the other.
_ALIGN = 4
_TABLE_WIDTH_MULTIPLE = 16


def _aligned(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


class ModelRunner:
    def __init__(
        self,
        model: LlamaForCausalLM,
        kv_cache: torch.Tensor,
        attn: AttentionBackend,
        block_size: int,
        sampler: Sampler,
        *,
        cuda_graphs: bool | None = None,
        max_graph_batch: int = DEFAULT_MAX_GRAPH_BATCH,
    ) -> None:
        """``cuda_graphs``: None = on exactly when the fused Triton path is (CUDA + Triton attention)."""
        self.model = model
        self.kv_cache = kv_cache  # [L, 2, num_blocks, block_size, Hkv, D]
        self.attn = attn
        self.block_size = block_size
        self.sampler = sampler
        self.device = kv_cache.device
        # K and V of one token over all layers: [L, 2, ..., Hkv, D] per slot.
        self.kv_bytes_per_token = kv_cache[:, :, 0, 0].numel() * kv_cache.element_size()
        self.uses_triton_ops = self.device.type == "cuda" and attn.name == "triton"
        if self.uses_triton_ops:
            model.use_triton_ops()
            # Few-row linears (decode at batch 1..4) through the faster of the Triton GEMV and
            # cuBLAS, measured per shape now, before any graph is captured.
            self.gemv = GemvDispatch(self.device)
            install_gemv(model, self.gemv)
            self.gemv.prepare_modules(model, rows=[b for b in graph_batch_sizes(max_graph_batch) if b <= 4])
            # Prefill-attention tile variants, compiled now rather than by the first steps that need them.
            from engine.kernels.prefill_attention import warm_up_prefill_attention  # CUDA only: lazily

            warm_up_prefill_attention(kv_cache[0], model.config.num_heads)
        # On CPU (plain-torch ops) eager steps run the flat forward: the model's ops without the
        # module dispatch around them, bit-identical (engine/models/cpu_forward.py).
        self.flat_cpu_forward = self.device.type == "cpu" and isinstance(model.ops, TorchOps)
        self.staging = PinnedStaging() if self.device.type == "cuda" else None
        self._ahead: Lookahead | None = None
        self.lookahead_counts = {"used": 0, "dropped": 0}  # lookahead steps taken / thrown away
        self._token_host: torch.Tensor | None = None  # pinned landing place of a step's greedy tokens
        self._launched: deque[torch.cuda.Event] | None = deque() if self.device.type == "cuda" else None
        # Called with each step's batch once its forward is queued, before any of its tokens is read
        # back: a prefill worker queues the KV sends of prompts this step completes right behind it.
        self.launched_hook: Callable[[ScheduledBatch], None] | None = None
        if cuda_graphs is None:
            cuda_graphs = self.uses_triton_ops
        if cuda_graphs and not self.uses_triton_ops:
            raise ValueError("CUDA graphs need a CUDA device and the Triton attention backend")
        self.graphs = (
            DecodeGraphs(model, kv_cache, attn, block_size, model.rope.max_positions, max_graph_batch)
            if cuda_graphs
            else None
        )

    def capture_cuda_graphs(self, max_batch: int | None = None) -> float:
        """Capture the decode graphs up front (else each bucket is captured on first use).
        Returns seconds spent; 0 when graphs are off."""
        return self.graphs.capture_all(max_batch) if self.graphs is not None else 0.0

    @property
    def max_graph_rows(self) -> int | None:
        """Most query tokens a step may have and still run from a CUDA graph (None: no graphs)."""
        return self.graphs.max_batch if self.graphs is not None else None

    @property
    def max_graph_extra_reads(self) -> int:
        """Most extra context tokens the rows beyond a request's first may read in a graph step."""
        return MAX_GRAPH_EXTRA_KV_BYTES // self.kv_bytes_per_token

    # --- inputs ------------------------------------------------------------------------------
    def _host_buffer(self, size: int) -> np.ndarray:
        if self.staging is None:
            return np.empty(size, dtype=np.int32)
        return self.staging.host(size)

    def _to_device(self, host: np.ndarray) -> torch.Tensor:
        if self.staging is None:
            return torch.from_numpy(host)
        dev = torch.empty(host.shape[0], dtype=torch.int32, device=self.device)
        self.staging.upload(dev, host.shape[0])
        return dev

    def prepare(self, batch: ScheduledBatch) -> BatchInputs:
        """Flatten the batch into one int32 host buffer, laid out as
        ``[ids T | positions T | slots T | logits rows R | seq_lens B | query_start_loc B+1 | table B*w]``,
        move it in one copy, and take typed views of it.

        Every segment starts on a 16-byte boundary and the table's width is a multiple of 16:
        Triton compiles a kernel variant per pointer alignment and per "stride divisible by 16",
        so unaligned views would make each new batch shape compile (seconds) in the middle of
        serving. ``T`` is the token count rounded up to 4, and so on (``_ALIGN``)."""
        bs = self.block_size
        reqs = batch.requests
        num_seqs = len(reqs)
        num_tokens = sum(s.num_new_tokens for s in reqs)
        seq_lens = [s.request.num_computed_tokens + s.num_new_tokens for s in reqs]
        query_lens = tuple(s.num_new_tokens for s in reqs)
        qstart = np.zeros(num_seqs + 1, dtype=np.int64)
        np.cumsum(query_lens, out=qstart[1:])
        sampled = [s.request for s in reqs if s.samples]
        rows = [
            int(qstart[i + 1]) - s.num_logits_rows + j
            for i, s in enumerate(reqs)
            if s.samples
            for j in range(s.num_logits_rows)
        ]
        width = _aligned(max(-(-sl // bs) for sl in seq_lens), _TABLE_WIDTH_MULTIPLE)

        t, r = num_tokens, len(rows)
        t_pad = _aligned(t, _ALIGN)
        o_rows = 3 * t_pad
        o_lens = _aligned(o_rows + r, _ALIGN)
        o_qsl = _aligned(o_lens + num_seqs, _ALIGN)
        o_table = _aligned(o_qsl + num_seqs + 1, _ALIGN)
        host = self._host_buffer(o_table + num_seqs * width)
        o = 0
        for s in reqs:
            req, start, n = s.request, s.request.num_computed_tokens, s.num_new_tokens
            host[o : o + n] = _tokens(req, start, n)
            if n == 1:
                host[t_pad + o] = start
                host[2 * t_pad + o] = req.block_ids[start // bs] * bs + start % bs
            else:
                p = np.arange(start, start + n)
                host[t_pad + o : t_pad + o + n] = p
                host[2 * t_pad + o : 2 * t_pad + o + n] = np.asarray(req.block_ids)[p // bs] * bs + p % bs
            o += n
        host[o_rows : o_rows + r] = rows
        host[o_lens : o_lens + num_seqs] = seq_lens
        host[o_qsl : o_qsl + num_seqs + 1] = qstart
        table = host[o_table:].reshape(num_seqs, width)
        table.fill(0)
        for i, s in enumerate(reqs):
            ids = s.request.block_ids[:width]
            table[i, : len(ids)] = ids

        dev = self._to_device(host)
        longs = dev[:o_lens].long()  # a new tensor: its segments keep their (even) offsets
        meta = AttentionMetadata(
            query_start_loc=dev[o_qsl : o_qsl + num_seqs + 1],
            seq_lens=dev[o_lens : o_lens + num_seqs],
            block_tables=dev[o_table:].view(num_seqs, width),
            slot_mapping=longs[2 * t_pad : 2 * t_pad + t],
            max_query_len=max(query_lens),
            max_seq_len=max(seq_lens),
            query_lens_cpu=query_lens,
            seq_lens_cpu=tuple(seq_lens),
            seq_ids=tuple(s.request.request_id for s in reqs),
        )
        return BatchInputs(longs[:t], longs[t_pad : t_pad + t], meta, longs[o_rows : o_rows + r], tuple(sampled))

    # --- execution ---------------------------------------------------------------------------
    def _runs_flat_forward(self) -> bool:
        """The flat forward replicates ``LlamaForCausalLM.forward``: a model whose forward is
        another (a subclass's own, or one replaced on the instance) runs through that one."""
        m = self.model
        return self.flat_cpu_forward and type(m).forward is LlamaForCausalLM.forward and "forward" not in vars(m)

    def _graph_bucket(self, batch: ScheduledBatch) -> int | None:
        if self.graphs is None or any(s.num_new_tokens > MAX_GRAPH_QUERY_LEN for s in batch.requests):
            return None
        extra_reads = sum(
            (s.num_new_tokens - 1) * (s.request.num_computed_tokens + s.num_new_tokens)
            for s in batch.requests
        )
        if extra_reads * self.kv_bytes_per_token > MAX_GRAPH_EXTRA_KV_BYTES:
            return None
        return self.graphs.bucket(batch.num_tokens)

    def _execute_graph(self, batch: ScheduledBatch) -> tuple[torch.Tensor, list[Request]]:
        """One graph row per scheduled token; returns the logits of the rows that are sampled (a
        sampling request's last ``num_logits_rows`` rows, in batch order) and their requests."""
        tokens: list[int] = []
        positions: list[int] = []
        tables: list[list[int]] = []
        rows: list[int] = []
        sampled: list[Request] = []
        for s in batch.requests:
            r, start, n = s.request, s.request.num_computed_tokens, s.num_new_tokens
            tokens += _tokens(r, start, n)
            positions += range(start, start + n)
            tables += [r.block_ids] * n
            if s.samples:
                rows += range(len(tokens) - s.num_logits_rows, len(tokens))
                sampled.append(r)
        logits = self.graphs.run(tokens, positions, tables)  # [rows, V]
        return select_rows(logits, rows), sampled

    def _bound_run_ahead(self) -> None:
        """Keep the host at most ``MAX_STEPS_AHEAD`` steps ahead of the device.

        A step that samples nothing (a prefill chunk) never waits for the device, so a prefill
        worker's loop would otherwise queue seconds of GPU work: every call into the loop (a health
        check, a new request) then waits behind that backlog, and the loop's clocks (prefill done,
        KV sent) run ahead of what the device has actually done."""
        if self._launched is None:
            return
        event = torch.cuda.Event()
        event.record()
        self._launched.append(event)
        while len(self._launched) > MAX_STEPS_AHEAD:
            self._launched.popleft().synchronize()  # waits without the GIL

    # --- lookahead decoding -------------------------------------------------------------------
    @property
    def can_look_ahead(self) -> bool:
        """Whether decode steps may be launched ahead (device-fed decode graphs exist)."""
        return self.graphs is not None

    def lookahead_pending(self) -> bool:
        """Whether a lookahead step is in flight (launched, its logits not yet taken or dropped)."""
        return self._ahead is not None

    def _matches(self, ahead: Lookahead, batch: ScheduledBatch) -> bool:
        """Whether ``batch`` is the step ``ahead`` computed: same requests in the same order, one
        token each at the predicted position, and that token the one fed on the device."""
        reqs = batch.requests
        if len(reqs) != len(ahead.request_ids):
            return False
        for s, rid, pos, tok in zip(reqs, ahead.request_ids, ahead.positions, ahead.tokens, strict=True):
            r = s.request
            if r.request_id != rid or s.num_new_tokens != 1 or r.num_computed_tokens != pos:
                return False
            if not s.samples or not r.output_token_ids or r.output_token_ids[-1] != tok:
                return False
        return True

    def _can_look_ahead(self, batch: ScheduledBatch) -> bool:
        """A decode-only graph step whose tokens are plain argmaxes (greedy, no logprobs, nothing
        that edits logits, from the stock sampler) and whose every request surely runs again: not
        at its last token, the next position's KV slot already allocated."""
        if self.graphs is None or len(batch.requests) > FED_MAX_BATCH:
            return False
        if type(self.sampler) is not Sampler:
            return False  # a replaced sampler (teacher forcing, recording) makes its own choices

        bs, limit = self.block_size, self.graphs.max_context
        for s in batch.requests:
            r, sp = s.request, s.request.sampling
            if s.num_new_tokens != 1 or not s.samples or not sp.greedy or sp.logprobs is not None:
                return False
            if sp.needs_penalties or sp.logit_bias or len(r.output_token_ids) < sp.min_tokens:
                return False
            nxt = r.num_computed_tokens + 1
            if len(r.output_token_ids) + 1 >= sp.max_tokens or nxt >= limit or nxt // bs >= len(r.block_ids):
                return False
        return True

    def _greedy_with_lookahead(self, batch: ScheduledBatch, logits: torch.Tensor, sampled: list[Request]) -> StepOutput:
        """Argmax on the device; launch the next step fed with it; only then wait for the tokens.

        The next step (same requests, one position on) runs on the device while the host applies
        this step's tokens and schedules: if the schedule is that step, ``execute`` takes its
        logits instead of launching it. If not (a request stopped, another arrived), they are
        dropped; its KV writes stay harmless: each went to the slot its request's next token takes,
        with that token's values, and a freed block is reused only by later work in stream order."""
        n = len(sampled)
        tokens_dev = logits.argmax(dim=-1)
        if self._token_host is None or self._token_host.numel() < n:
            self._token_host = torch.empty(max(n, 64), dtype=torch.int64, pin_memory=True)
        landing = self._token_host[:n]
        landing.copy_(tokens_dev, non_blocking=True)
        landed = torch.cuda.Event()
        landed.record()
        reqs = [s.request for s in batch.requests]
        positions = [r.num_computed_tokens + 1 for r in reqs]
        ahead = self.graphs.run_fed(tokens_dev, positions, [r.block_ids for r in reqs])
        landed.synchronize()  # this step only, without the GIL; the lookahead keeps the GPU busy
        tokens = landing.tolist()
        if ahead is not None:
            self._ahead = Lookahead(tuple(r.request_id for r in reqs), tuple(positions), ahead, tuple(tokens))
        ids = [r.request_id for r in sampled]
        return StepOutput(dict(zip(ids, tokens, strict=True)), dict.fromkeys(ids))

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch, lookahead: bool = False) -> StepOutput:
        """Run one step. ``lookahead``: the caller expects the same requests to decode again next
        step (nothing waits to be admitted), so an eligible decode step may launch the next one
        before its own tokens reach the host (``_greedy_with_lookahead``)."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None:
            use = self._matches(ahead, batch)
            self.lookahead_counts["used" if use else "dropped"] += 1
        if ahead is not None and use:
            logits, sampled = ahead.logits, [s.request for s in batch.requests]
        elif self._graph_bucket(batch) is not None:
            logits, sampled = self._execute_graph(batch)
        else:
            inputs = self.prepare(batch)
            args = (inputs.input_ids, inputs.positions, self.kv_cache, inputs.meta, self.attn)
            hidden = cpu_forward(self.model, *args) if self._runs_flat_forward() else self.model(*args)
            sampled = list(inputs.sampled_requests)
            logits = self.model.compute_logits(hidden[inputs.logits_rows]) if sampled else None
        if self.launched_hook is not None:
            self.launched_hook(batch)
        if not sampled:
            self._bound_run_ahead()
            return StepOutput({}, {})
        if self._launched:
            # Reading this step's tokens back waits for every launched step: no event needed.
            self._launched.clear()
        if batch.has_spec:
            return StepOutput({}, {}, logits)
        if lookahead and self._can_look_ahead(batch):
            return self._greedy_with_lookahead(batch, logits, sampled)
        out = self.sampler(logits, sampled)
        ids = [r.request_id for r in sampled]
        return StepOutput(
            dict(zip(ids, out.token_ids, strict=True)), dict(zip(ids, out.logprobs, strict=True))
        )
