"""Pure-torch paged attention: the reference every kernel is tested against, and the CPU backend.

Decode rows (one query per sequence) are batched into one padded attention over all of them; sequences
with several query rows (prefill chunks, speculative verification) are computed one by one, so a long
chunk never pads a whole batch of decodes to its length.

Both gather the context's KV blocks (whole blocks: an ``index_select`` of contiguous rows for K
and one for V, per layer) and run ``scaled_dot_product_attention`` on strided views of them (``[.., L, Hkv, D]`` read
as ``[.., Hkv, L, D]``, GQA without repeating KV heads): on CPU its fused kernel beats explicit
matmuls, in fp32 and even more in bf16, and it is the attention HF's default ``sdpa`` runs.
What depends only on the step (which blocks to gather, the padding mask) is built once per step,
on the first layer's call, and reused by the others: ``AttentionMetadata`` is one object per step.
On CPU, steps in which every sequence decodes read their contexts from ``DecodeMirror`` instead
of gathering them: consecutive decode steps of the same batch then copy only the new tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.attention.base import AttentionMetadata
from engine.attention.decode_mirror import DecodeMirror, MirrorStep


@dataclass(frozen=True)
class _DecodePlan:
    """Shared by every layer of a step: the decode sequences' blocks, flattened, and their mask."""

    block_ids: torch.Tensor  # int64 [B * nb], row b's blocks first (table padded with block 0)
    num_blocks: int  # nb: blocks per padded sequence
    # One sequence whose blocks are consecutive in the cache (CPU only): its first block, so its
    # K/V are read as a slice of the cache instead of gathered.
    first_block: int | None
    mask: torch.Tensor | None  # additive [B, 1, 1, nb * block_size] (0 / -inf), None if no padding
    rows: torch.Tensor | None  # query rows of the decode sequences (None: every row, in order)
    mirror: MirrorStep | None = None  # read K/V from the mirrors (CPU, every row a decode)


class TorchAttention:
    name = "torch"
    reads_block_major = False  # layers are reshaped with ``view``: the cache must be layer-major

    def __init__(self) -> None:
        # The step whose plan is cached (its metadata and KV dtype), and the plan.
        self._plan_key: tuple[AttentionMetadata, torch.dtype, int] | None = None
        self._plan: _DecodePlan | None = None
        self.mirror = DecodeMirror()

    def write_kv(
        self, k: torch.Tensor, v: torch.Tensor, kv_layer: torch.Tensor, slot_mapping: torch.Tensor
    ) -> None:
        # K and V in one index_copy_ over the layer viewed as [2, slots, Hkv, D]: fewer ops per
        # layer (what a small decode step pays for), the same bytes written.
        num_kv_heads, head_dim = k.shape[1], k.shape[2]
        kv = torch.stack((k, v))  # [2, T, Hkv, D]
        if kv.dtype != kv_layer.dtype:
            kv = kv.to(kv_layer.dtype)
        kv_layer.view(2, -1, num_kv_heads, head_dim).index_copy_(1, slot_mapping, kv)

    def attend(
        self, q: torch.Tensor, kv_layer: torch.Tensor, meta: AttentionMetadata, scale: float
    ) -> torch.Tensor:
        plan = self._decode_plan(meta, kv_layer)
        if plan is not None and plan.rows is None:
            return self._decode(q, kv_layer, plan, scale)
        out = torch.empty_like(q)
        if plan is not None:
            out[plan.rows] = self._decode(q[plan.rows], kv_layer, plan, scale)
        start = 0
        for b, n in enumerate(meta.query_lens_cpu):
            if n > 1:
                out[start : start + n] = self._prefill_one(q[start : start + n], kv_layer, meta, scale, b)
            start += n
        return out

    # --- decode: one query per sequence ------------------------------------------------------
    def _decode_plan(self, meta: AttentionMetadata, kv_layer: torch.Tensor) -> _DecodePlan | None:
        key = (meta, kv_layer.dtype, kv_layer.shape[2])
        cached = self._plan_key
        if cached is not None and cached[0] is meta and cached[1:] == key[1:]:
            return self._plan
        seqs = [b for b, n in enumerate(meta.query_lens_cpu) if n == 1]
        self._plan_key, self._plan = key, None
        if not seqs or len(seqs) != meta.num_seqs:
            self.mirror.skip()
        if not seqs:
            return None
        block_size = kv_layer.shape[2]
        device = meta.block_tables.device
        lens = [meta.seq_lens_cpu[b] for b in seqs]
        nb = -(-max(lens) // block_size)
        everyone = len(seqs) == meta.num_seqs
        table = meta.block_tables[:, :nb] if everyone else meta.block_tables[seqs, :nb]
        mask = None
        if min(lens) != nb * block_size:
            lens_t = torch.tensor(lens, device=device)
            pad = torch.arange(nb * block_size, device=device)[None, :] >= lens_t[:, None]  # [B, L]
            mask = torch.zeros(pad.shape, dtype=kv_layer.dtype, device=device)
            mask = mask.masked_fill_(pad, float("-inf"))[:, None, None, :]
        rows = None
        if not everyone:
            starts = meta.query_start_loc.tolist()
            rows = torch.tensor([starts[b] for b in seqs], device=device)
        first = None
        if len(seqs) == 1 and device.type == "cpu":  # reading the table costs no device sync here
            ids = table[0].tolist()
            if ids == list(range(ids[0], ids[0] + nb)):
                first = ids[0]
        mirror = None
        if everyone and first is None and device.type == "cpu":
            mirror = self.mirror.plan(meta.seq_ids, tuple(lens), table, meta.slot_mapping, kv_layer)
        elif everyone:
            self.mirror.skip()
        self._plan = _DecodePlan(
            block_ids=table.reshape(-1).long(),
            num_blocks=nb,
            first_block=first,
            mask=mask,
            rows=rows,
            mirror=mirror,
        )
        return self._plan

    def _decode(
        self, q: torch.Tensor, kv_layer: torch.Tensor, plan: _DecodePlan, scale: float
    ) -> torch.Tensor:
        # q: [B, Hq, D] -> [B, Hq, 1, D]; K/V of each sequence's blocks: [B, L, Hkv, D] viewed as
        # [B, Hkv, L, D] (L = nb * block_size, the tail past each sequence's length masked).
        _, num_blocks, block_size, hkv, d = kv_layer.shape
        b, hq = q.shape[0], q.shape[1]
        length = plan.num_blocks * block_size
        if plan.mirror is not None:
            k, v = self.mirror.read(kv_layer, plan.mirror)
        elif plan.first_block is not None:
            first = plan.first_block
            k, v = (kv_layer[i, first : first + plan.num_blocks].view(b, length, hkv, d) for i in (0, 1))
        else:
            k, v = (_gather_blocks(kv_layer[i], plan.block_ids).view(b, length, hkv, d) for i in (0, 1))
        out = F.scaled_dot_product_attention(
            q.view(b, hq, 1, d) if q.dtype == k.dtype else q.view(b, hq, 1, d).to(k.dtype),
            k.transpose(1, 2),
            v.transpose(1, 2),
            attn_mask=plan.mask,
            scale=scale,
            enable_gqa=hq != hkv,
        )
        return out.view(b, hq, d) if out.dtype == q.dtype else out.view(b, hq, d).to(q.dtype)

    # --- several queries of one sequence (prefill chunk, verification) ----------------------------
    def _prefill_one(
        self, q: torch.Tensor, kv_layer: torch.Tensor, meta: AttentionMetadata, scale: float, b: int
    ) -> torch.Tensor:
        # q: [n, Hq, D]; the n queries are the last n of a context of seq_len tokens (causal).
        _, num_blocks, block_size, hkv, d = kv_layer.shape
        seq_len = meta.seq_lens_cpu[b]
        n, hq = q.shape[0], q.shape[1]
        nb = -(-seq_len // block_size)
        blocks = meta.block_tables[b, :nb].long()
        k, v = (_gather_blocks(kv_layer[i], blocks).view(nb * block_size, hkv, d) for i in (0, 1))
        k = k[:seq_len].transpose(0, 1)[None]  # [1, Hkv, L, D] (a strided view)
        v = v[:seq_len].transpose(0, 1)[None]
        qh = q.transpose(0, 1)[None].to(k.dtype)  # [1, Hq, n, D]
        if n == seq_len:  # the whole context is new: plain causal
            out = F.scaled_dot_product_attention(qh, k, v, is_causal=True, scale=scale, enable_gqa=hq != hkv)
        else:  # query i sits at position seq_len - n + i and sees keys up to there
            keys = torch.arange(seq_len, device=q.device)
            q_pos = torch.arange(seq_len - n, seq_len, device=q.device)
            allowed = keys[None, :] <= q_pos[:, None]  # [n, L]
            out = F.scaled_dot_product_attention(
                qh, k, v, attn_mask=allowed, scale=scale, enable_gqa=hq != hkv
            )
        return out[0].transpose(0, 1).to(q.dtype)  # [n, Hq, D]


def _gather_blocks(cache: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
    """``cache [num_blocks, block_size, Hkv, D]`` -> its blocks ``block_ids`` as ``[n, block_size * Hkv * D]``.
    One index over the leading dimension of contiguous rows: the fast form of the gather on CPU."""
    return cache.view(cache.shape[0], -1).index_select(0, block_ids)
