"""The CPU path's shortcuts compute exactly what the plain formulations do (bit for bit where the
formulation only reorders exact operations)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from engine.attention.base import AttentionMetadata
from engine.attention.torch_ref import TorchAttention
from engine.models.layers import RMSNorm, RotaryEmbedding, TorchOps
from engine.quantization import Int4Linear, Int8Linear
from engine.quantization.packed_bf16 import pack_bf16, packing_available
from engine.sampling.sampler import greedy_argmax


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_is_hf_rotate_half_bit_for_bit(dtype):
    rope = RotaryEmbedding(64, 256, 10000.0, None)
    positions = torch.tensor([0, 3, 200, 254])
    qkv = torch.randn(4, (6 + 2 + 2) * 64).to(dtype)  # fused projection output: q, k, v heads
    q, k, _ = qkv.split([6 * 64, 2 * 64, 2 * 64], dim=-1)
    q, k = q.view(4, 6, 64), k.view(4, 2, 64)
    cos = rope.cos[positions].unsqueeze(1).to(dtype)
    sin = rope.sin[positions].unsqueeze(1).to(dtype)
    want_q, want_k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
    ops = TorchOps()
    got_q, got_k = ops.rotary(positions, q, k, rope)  # adjacent q/k heads: rotated together
    assert torch.equal(got_q, want_q) and torch.equal(got_k, want_k)
    apart_q, apart_k = ops.rotary(positions, q.clone(), k.clone(), rope)  # separate tensors
    assert torch.equal(apart_q, want_q) and torch.equal(apart_k, want_k)
    new_positions = positions + 1  # a new step's positions: the cached tables must not be reused
    step_q, _ = ops.rotary(new_positions, q, k, rope)
    assert torch.equal(
        step_q,
        q * rope.cos[new_positions].unsqueeze(1).to(dtype)
        + _rotate_half(q) * rope.sin[new_positions].unsqueeze(1).to(dtype),
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_is_hf_formula_bit_for_bit(dtype):
    norm = RMSNorm(96, 1e-6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    norm = norm.to(dtype)
    x = (torch.randn(17, 96) * 5).to(dtype)
    x32 = x.float()
    want = norm.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6)).to(dtype)
    assert torch.equal(norm(x), want)


def test_greedy_argmax_is_argmax():
    torch.manual_seed(0)
    logits = torch.randn(5, 4096)
    logits[0, 100] = logits[0, 3000] = 50.0  # a tie: the first maximum wins
    logits[1, 7] = logits[1, 2000] = float("nan")  # NaN counts as the maximum, first one wins
    logits[2] = 1.0  # all equal
    assert torch.equal(greedy_argmax(logits), logits.argmax(dim=-1))
    odd = torch.randn(3, 1000)  # not a multiple of the chunk: plain argmax
    assert torch.equal(greedy_argmax(odd), odd.argmax(dim=-1))


def _decode_meta(block_table: list[list[int]], seq_lens: list[int], block_size: int) -> AttentionMetadata:
    n = len(seq_lens)
    slots = [
        row[(s - 1) // block_size] * block_size + (s - 1) % block_size
        for row, s in zip(block_table, seq_lens, strict=True)
    ]
    return AttentionMetadata(
        query_start_loc=torch.arange(n + 1, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_tables=torch.tensor(block_table, dtype=torch.int32),
        slot_mapping=torch.tensor(slots),
        max_query_len=1,
        max_seq_len=max(seq_lens),
        query_lens_cpu=(1,) * n,
        seq_lens_cpu=tuple(seq_lens),
    )


def _dense_attention(q, kv_layer, table_row, seq_len, scale):
    # q: [Hq, D]; plain softmax(q k^T) v over the sequence's first seq_len cached positions.
    _, _, block_size, hkv, d = kv_layer.shape
    k = kv_layer[0, table_row].reshape(-1, hkv, d)[:seq_len].float()
    v = kv_layer[1, table_row].reshape(-1, hkv, d)[:seq_len].float()
    group = q.shape[0] // hkv
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # [L, Hq, D]
    probs = torch.softmax(torch.einsum("hd,lhd->hl", q.float(), k) * scale, dim=-1)
    return torch.einsum("hl,lhd->hd", probs, v)


@pytest.mark.parametrize("table", [[[3, 4, 5]], [[5, 2, 9]], [[1, 2, 0], [6, 7, 8], [9, 3, 0]]])
def test_decode_attention_gathered_or_sliced_is_dense_attention(table):
    """One sequence with consecutive blocks is read as a slice of the cache, others are gathered
    (padded, masked): both equal plain attention over each sequence's own context."""
    torch.manual_seed(0)
    block_size, hkv, hq, d = 4, 2, 6, 16
    kv_layer = torch.randn(2, 12, block_size, hkv, d)
    seq_lens = [10, 12, 7][: len(table)]
    meta = _decode_meta(table, seq_lens, block_size)
    q = torch.randn(len(table), hq, d)
    attn = TorchAttention()
    out = attn.attend(q, kv_layer, meta, 0.25)
    for b, row in enumerate(table):
        want = _dense_attention(q[b], kv_layer, row, seq_lens[b], 0.25)
        torch.testing.assert_close(out[b], want, rtol=1e-5, atol=1e-5)
    assert (attn._plan.first_block is not None) == (table == [[3, 4, 5]])


# Every linear shape of the default model (SmolLM2-135M: hidden 576, 9 + 3 + 3 heads of 64,
# intermediate 1536, vocab 49152), [out, in].
_DEFAULT_MODEL_LINEARS = [(960, 576), (576, 576), (3072, 576), (576, 1536), (49152, 576)]


@pytest.mark.skipif(not packing_available(), reason="no oneDNN bf16 packing in this torch/CPU")
@pytest.mark.parametrize("shape", _DEFAULT_MODEL_LINEARS)
def test_packed_bf16_linear_is_f_linear_bit_for_bit(shape):
    torch.manual_seed(0)
    w = (torch.randn(shape) * 0.05).to(torch.bfloat16)
    packed = pack_bf16(w)
    assert packed is not None
    for rows in (1, 3, 5, 32, 64, 200):  # decode batches, prefill chunks
        x = torch.randn(rows, shape[1]).to(torch.bfloat16)
        assert torch.equal(packed(x), F.linear(x, w)), rows


def test_int4_and_int8_linears_many_rows_equal_f_linear_on_their_bf16_weights():
    """The many-row path (pre-packed where available) computes ``F.linear`` on the bf16 copy."""
    torch.manual_seed(0)
    lin = nn.Linear(576, 960, bias=False)
    for q in (Int4Linear.from_float(lin), Int8Linear(lin)):
        x = torch.randn(40, 576).to(torch.bfloat16)
        assert torch.equal(q(x), F.linear(x, q.weight_bf16))
        assert (q._packed_bf16 is not None) == packing_available()


def _decode_step_meta(tables: list[list[int]], seq_lens: list[int], bs: int, ids) -> AttentionMetadata:
    return replace(_decode_meta(tables, seq_lens, bs), seq_ids=ids)


def _write_token(kv_layer, meta, bs, gen):
    """What ``write_kv`` does for a decode step: one new K/V per sequence at its slot."""
    _, _, _, hkv, d = kv_layer.shape
    k, v = torch.randn(2, len(meta.seq_lens_cpu), hkv, d, generator=gen).to(kv_layer.dtype)
    TorchAttention().write_kv(k, v, kv_layer, meta.slot_mapping)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_mirror_equals_gathered_attention_bit_for_bit(dtype):
    """Decode steps of a batch that continues (append only), grows past the mirror's capacity
    (rebuild), changes membership or length (rebuild), carries no ids (gather), and a layer that
    missed a step (rebuild): every step's output equals the gather path's, bit for bit."""
    gen = torch.Generator().manual_seed(0)
    bs, hkv, hq, d, layers = 4, 2, 6, 16, 2
    cache = torch.randn(layers, 2, 64, bs, hkv, d, generator=gen).to(dtype)
    tables = [[5, 9, 2, 40, 41, 42, 43, 44], [7, 3, 30, 31, 32, 33, 34, 35], [11, 12, 20, 21, 22, 23, 24, 25]]
    mirrored, gathered = TorchAttention(), TorchAttention()
    lens = [6, 9, 3]
    ids = ("a", "b", "c")
    plan = []  # (ids, lens, layers run) per step
    for _ in range(20):  # continuing steps: "b" grows from 3 blocks to 7, past the capacity (6)
        plan.append((ids, list(lens), range(layers)))
        lens = [n + 1 for n in lens]
    plan.append((("a", "c"), [lens[0], lens[2]], range(layers)))  # "b" finished
    plan.append((("a", "c"), [lens[0] + 1, lens[2] + 1], range(1)))  # layer 1 misses this step
    plan.append((("a", "c"), [lens[0] + 2, lens[2] + 2], range(layers)))
    plan.append((None, [lens[0] + 3, lens[2] + 3], range(layers)))  # no ids: gather
    plan.append((("a", "c"), [lens[0] + 5, lens[2] + 5], range(layers)))  # a jump: rebuild
    for step_ids, step_lens, run in plan:
        rows = [0, 1, 2] if len(step_lens) == 3 else [0, 2]
        width = max(-(-n // bs) for n in step_lens)
        table = [tables[r][:width] for r in rows]
        meta = _decode_step_meta(table, step_lens, bs, step_ids)
        plain = replace(meta, seq_ids=None)
        q = torch.randn(len(rows), hq, d, generator=gen).to(dtype)
        for layer in run:
            _write_token(cache[layer], meta, bs, gen)
            got = mirrored.attend(q, cache[layer], meta, 0.25)
            want = gathered.attend(q, cache[layer], plain, 0.25)
            assert torch.equal(got, want), (step_ids, step_lens, layer)
            assert (mirrored._plan.mirror is not None) == (step_ids is not None)
    # Appends, not rebuilds, in the steps that continue: 2 layers x (first step, capacity
    # growth once, "b" leaving, layer 1's missed step, the jump).
    assert mirrored.mirror.rebuilds == 2 + 2 + 2 + 1 + 2


def test_decode_mirror_is_dropped_when_over_its_budget():
    attn = TorchAttention()
    attn.mirror.max_bytes_per_layer = 1024
    cache = torch.randn(1, 2, 16, 4, 2, 16)
    meta = _decode_step_meta([[1, 2], [3, 4]], [6, 7], 4, ("a", "b"))
    out = attn.attend(torch.randn(2, 6, 16), cache[0], meta, 0.25)
    assert attn._plan.mirror is None and out.shape == (2, 6, 16)


@pytest.mark.parametrize(
    "shape, quantization", [("tiny-llama", None), ("tiny-llama", "int4"), ("tiny-qwen2", None)]
)
def test_cpu_forward_is_the_module_forward_bit_for_bit(shape, quantization, monkeypatch):
    """The flat CPU forward runs the module path's ops: every step of an engine run (prefills, a
    mixed step, decodes of one and of several sequences) gives the module forward's hidden states
    and writes the same KV cache, bit for bit."""
    import engine.runner
    from engine.builder import build_engine
    from engine.config import CacheConfig
    from engine.models.cpu_forward import cpu_forward
    from engine.sampling.params import SamplingParams
    from engine.weights.dummy import dummy_hf_config, dummy_weights

    checked = []

    def checked_forward(model, input_ids, positions, kv_cache, meta, attn):
        cache = kv_cache.clone()
        want = model(input_ids, positions, cache, meta, TorchAttention())
        got = cpu_forward(model, input_ids, positions, kv_cache, meta, attn)
        assert torch.equal(got, want) and torch.equal(kv_cache, cache), len(checked)
        checked.append(meta.query_lens_cpu)
        return got

    monkeypatch.setattr(engine.runner, "cpu_forward", checked_forward)
    weights = dummy_weights(dummy_hf_config(shape), torch.float32, "cpu", seed=0)
    eng = build_engine(
        weights.hf_config, weights.tensors, quantization=quantization,
        cache=CacheConfig(block_size=4, num_blocks=128),
    )  # fmt: skip
    assert eng.runner.flat_cpu_forward
    sp = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    gen = torch.Generator().manual_seed(0)
    eng.add_request("a", torch.randint(5, 200, (9,), generator=gen).tolist(), sp)
    eng.step()
    eng.step()
    for rid, n in (("b", 5), ("c", 13)):  # join while "a" decodes: a mixed step
        eng.add_request(rid, torch.randint(5, 200, (n,), generator=gen).tolist(), sp)
    while eng.has_unfinished():
        eng.step()
    assert (1,) in checked and (1, 1, 1) in checked and any(max(q) > 1 and 1 in q for q in checked)
