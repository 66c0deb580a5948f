"""Pure-torch paged attention: the reference every kernel is tested against, and the CPU backend.

Decode rows (one query per sequence) are batched into one padded attention over all of them; sequences
with several query rows (prefill chunks, speculative verification) are computed one by one, so a long
chunk never pads a whole batch of decodes to its length. Attention is written as explicit GQA matmuls
(query heads grouped by their KV head) with an fp32 softmax: on CPU this is several times faster than
SDPA with a mask, and numerically it matches HF's attention well inside the 1e-4 logit tolerance.
"""

from __future__ import annotations

import torch

from engine.attention.base import AttentionMetadata

_QUERY_SLICE = 256  # query rows per score matrix in prefill (bounds memory on long prompts)


class TorchAttention:
    name = "torch"

    def write_kv(
        self, k: torch.Tensor, v: torch.Tensor, kv_layer: torch.Tensor, slot_mapping: torch.Tensor
    ) -> None:
        num_kv_heads, head_dim = k.shape[1], k.shape[2]
        k_flat = kv_layer[0].view(-1, num_kv_heads, head_dim)
        v_flat = kv_layer[1].view(-1, num_kv_heads, head_dim)
        k_flat.index_copy_(0, slot_mapping, k.to(kv_layer.dtype))
        v_flat.index_copy_(0, slot_mapping, v.to(kv_layer.dtype))

    def attend(
        self, q: torch.Tensor, kv_layer: torch.Tensor, meta: AttentionMetadata, scale: float
    ) -> torch.Tensor:
        out = torch.empty_like(q)
        decode_rows = [b for b, n in enumerate(meta.query_lens_cpu) if n == 1]
        if len(decode_rows) == meta.num_seqs:
            out[:] = self._decode(q, kv_layer, meta, scale, list(range(meta.num_seqs)))
            return out
        starts = meta.query_start_loc.tolist()
        if decode_rows:
            rows = torch.tensor([starts[b] for b in decode_rows], device=q.device)
            out[rows] = self._decode(q[rows], kv_layer, meta, scale, decode_rows)
        for b, n in enumerate(meta.query_lens_cpu):
            if n > 1:
                s = starts[b]
                out[s : s + n] = self._prefill_one(q[s : s + n], kv_layer, meta, scale, b)
        return out

    def _decode(self, q: torch.Tensor, kv_layer: torch.Tensor, meta: AttentionMetadata, scale: float, seqs: list[int]) -> torch.Tensor:
        # One query per sequence: explicit batched matmuls (cheaper than SDPA's kernel at these sizes).
        # q: [B, Hq, D]; keys of all sequences gathered in one index, padded to the longest: [B, L, Hkv, D].
        _, _, block_size, hkv, d = kv_layer.shape
        b, hq = q.shape[0], q.shape[1]
        lens = [meta.seq_lens_cpu[i] for i in seqs]
        max_len = max(lens)
        nb = -(-max_len // block_size)
        rows = meta.block_tables[seqs, :nb] if len(seqs) != meta.num_seqs else meta.block_tables[:, :nb]
        kv = kv_layer[:, rows.long()].flatten(2, 3)[:, :, :max_len]  # [2, B, L, Hkv, D]
        k = kv[0].permute(0, 2, 3, 1)  # [B, Hkv, D, L]
        v = kv[1].transpose(1, 2)  # [B, Hkv, L, D]
        qg = q.view(b, hkv, hq // hkv, d)  # query heads grouped by their KV head (GQA)
        scores = torch.matmul(qg, k.to(q.dtype)).float() * scale  # [B, Hkv, G, L]
        if min(lens) != max_len:
            lens_t = torch.tensor(lens, device=q.device)
            pad = torch.arange(max_len, device=q.device)[None, :] >= lens_t[:, None]  # [B, L]
            scores.masked_fill_(pad[:, None, None, :], float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(q.dtype)
        return torch.matmul(probs, v.to(q.dtype)).reshape(b, hq, d)

    def _prefill_one(self, q: torch.Tensor, kv_layer: torch.Tensor, meta: AttentionMetadata, scale: float, b: int) -> torch.Tensor:
        # q: [n, Hq, D]; the n queries are the last n of a context of seq_len tokens (causal).
        # Explicit GQA matmuls, query rows in slices so the score matrix stays small on long prompts.
        _, _, block_size, hkv, d = kv_layer.shape
        seq_len = meta.seq_lens_cpu[b]
        n, hq = q.shape[0], q.shape[1]
        g = hq // hkv
        nb = -(-seq_len // block_size)
        kv = kv_layer[:, meta.block_tables[b, :nb].long()].flatten(1, 2)[:, :seq_len]  # [2, L, Hkv, D]
        k = kv[0].permute(1, 2, 0).to(q.dtype)  # [Hkv, D, L]
        v = kv[1].transpose(0, 1).to(q.dtype)  # [Hkv, L, D]
        out = torch.empty_like(q)
        keys = torch.arange(seq_len, device=q.device)
        for lo in range(0, n, _QUERY_SLICE):
            hi = min(n, lo + _QUERY_SLICE)
            qs = q[lo:hi].permute(1, 0, 2).reshape(hkv, g * (hi - lo), d)  # [Hkv, G*m, D]
            scores = torch.matmul(qs, k).float().view(hkv, g, hi - lo, seq_len) * scale
            q_pos = torch.arange(seq_len - n + lo, seq_len - n + hi, device=q.device)
            scores.masked_fill_(keys[None, :] > q_pos[:, None], float("-inf"))
            probs = torch.softmax(scores, dim=-1).to(q.dtype).view(hkv, g * (hi - lo), seq_len)
            o = torch.matmul(probs, v).view(hq, hi - lo, d)  # heads ordered (kv head, group) = q head order
            out[lo:hi] = o.transpose(0, 1)
        return out
