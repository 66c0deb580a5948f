"""Weight-only quantization: int8 (per channel) and int4 (GGML Q4_1 blocks, used as stored in a GGUF).

The int4 mode's promise is "the GGUF's own weights": its packed codes, read back through torch's
int4 kernel itself, must equal the GGUF loader's dequantized tensors bit for bit; its kernels then
compute in bf16, so outputs are checked against a reference with a bf16-sized tolerance.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from engine.quantization import Int4Linear, Int8Linear, dequantize_q4_1, quantize_q4_1
from engine.quantization.int4 import INT4_MAX_ROWS


def test_int8_linear_is_close_to_float():
    torch.manual_seed(0)
    lin = nn.Linear(64, 48, bias=True)
    q = Int8Linear(lin)
    for rows in (1, 3, 40):  # both the int8 kernel (few rows) and the bf16 path (many rows)
        x = torch.randn(rows, 64)
        ref = lin(x)
        rel = (q(x) - ref).norm() / ref.norm()
        assert rel < 2e-2, rel
    assert q.qweight.dtype == torch.int8 and q.qweight.shape == (48, 64)


def test_quantize_q4_1_is_ggml_recipe():
    """Our float -> Q4_1 quantizer gives the very codes and scales GGML's reference writes."""
    gguf_quants = pytest.importorskip("gguf.quants")
    from gguf import GGMLQuantizationType

    from engine.quantization.gguf_q4 import unpack_q4_1

    w = torch.randn(48, 96) * torch.rand(48, 1) + torch.randn(48, 1)
    raw = gguf_quants.quantize(w.numpy(), GGMLQuantizationType.Q4_1)
    want = unpack_q4_1(raw)
    got = quantize_q4_1(w)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)
    deq = gguf_quants.dequantize(raw, GGMLQuantizationType.Q4_1)
    assert torch.equal(dequantize_q4_1(*got), torch.from_numpy(np.asarray(deq, dtype=np.float32)))


@pytest.mark.parametrize("out_features", [48, 40])  # 40: not a multiple of 16, padded for the kernel
@pytest.mark.parametrize("bias", [False, True])
def test_int4_linear_matches_its_weights(out_features, bias):
    torch.manual_seed(0)
    lin = nn.Linear(96, out_features, bias=bias)
    q = Int4Linear.from_float(lin)
    codes, d, m = quantize_q4_1(lin.weight)
    exact = dequantize_q4_1(codes, d, m)
    assert torch.equal(q.dequantized_weight(), exact)  # packing and fp32 scale/zero are exact
    for rows in (1, INT4_MAX_ROWS, INT4_MAX_ROWS + 1, 40):  # int4 kernel, then the bf16 matmul
        x = torch.randn(rows, 96)
        ref = x @ exact.t() + (lin.bias if bias else 0)
        got = q(x)
        assert got.dtype == torch.float32 and got.shape == (rows, out_features)
        rel = ((got - ref).norm() / ref.norm()).item()
        assert rel < 1e-2, (rows, rel)  # bf16 activations and bf16 scale/zero
        got_bf16 = q(x.bfloat16())
        assert got_bf16.dtype == torch.bfloat16
        assert ((got_bf16.float() - ref).norm() / ref.norm()).item() < 1e-2


def _tiny_q4_1_gguf(tmp_path: Path) -> Path:
    gguf_quants = pytest.importorskip("gguf.quants")
    from gguf import GGMLQuantizationType as Q

    from tests.engine.test_gguf import TINY_LLAMA, random_tensors, write_gguf

    path = tmp_path / "tiny-q4_1.gguf"
    write_gguf(
        path,
        TINY_LLAMA,
        random_tensors(TINY_LLAMA),
        encode=lambda n, v: (gguf_quants.quantize(v, Q.Q4_1), Q.Q4_1),
    )
    return path


def test_read_q4_1_tensors_matches_loader_dequantization(tmp_path):
    from engine.quantization.gguf_q4 import read_q4_1_tensors
    from engine.weights.gguf_loader import load_gguf

    path = _tiny_q4_1_gguf(tmp_path)
    floats = load_gguf(path, torch.float32).tensors
    blocks = read_q4_1_tensors(path)
    assert "model.layers.0.self_attn.q_proj.weight" in blocks  # rows put back in HF order, like the loader
    assert len(blocks) == sum(1 for t in floats.values() if t.dim() == 2)
    for name, (codes, d, m) in blocks.items():
        assert torch.equal(dequantize_q4_1(codes, d, m), floats[name]), name


def test_int4_engine_runs_the_gguf_weights_exactly(tmp_path):
    """Every decoder linear of an int4 engine holds the GGUF's Q4_1 weights exactly (read back
    through torch's own int4 kernel), and the engine generates."""
    from engine.builder import build_engine
    from engine.config import CacheConfig
    from engine.sampling.params import SamplingParams
    from engine.weights.gguf_loader import load_gguf

    path = _tiny_q4_1_gguf(tmp_path)
    loaded = load_gguf(path, torch.float32)
    eng = build_engine(
        loaded.hf_config, loaded.tensors, quantization="int4", quantization_gguf=str(path),
        cache=CacheConfig(block_size=4, num_blocks=64),
    )  # fmt: skip
    assert eng.config.dtype == torch.bfloat16  # "auto" means bf16 for int4
    t = loaded.tensors
    for i, layer in enumerate(eng.runner.model.layers):
        p = f"model.layers.{i}."
        want = {
            layer.self_attn.qkv_proj: torch.cat([t[p + f"self_attn.{n}_proj.weight"] for n in "qkv"]),
            layer.self_attn.o_proj: t[p + "self_attn.o_proj.weight"],
            layer.mlp.gate_up_proj: torch.cat([t[p + "mlp.gate_proj.weight"], t[p + "mlp.up_proj.weight"]]),
            layer.mlp.down_proj: t[p + "mlp.down_proj.weight"],
        }
        for module, weight in want.items():
            assert isinstance(module, Int4Linear)
            assert torch.equal(module.dequantized_weight(), weight)
    assert isinstance(eng.runner.model.lm_head, Int8Linear)
    req = eng.add_request(
        "r", [5, 6, 7, 8, 9], SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    )
    while eng.has_unfinished():
        eng.step()
    assert len(req.output_token_ids) == 6
    eng.check_integrity()


def test_unknown_quantization_is_refused():
    from engine.builder import build_engine
    from engine.config import CacheConfig
    from engine.weights import dummy_weights
    from tests.engine.oracle import TINY_LLAMA

    weights = dummy_weights(TINY_LLAMA, torch.float32, "cpu", 0)
    with pytest.raises(ValueError, match="int4"):
        build_engine(TINY_LLAMA, weights.tensors, quantization="int3", cache=CacheConfig(num_blocks=16))


def test_default_model_int8_answers():
    from engine.llm import LLM
    from engine.sampling.params import SamplingParams

    llm = LLM(quantization="int8")
    out = llm.chat(
        [{"role": "user", "content": "What is the capital of France?"}],
        SamplingParams(max_tokens=20, temperature=0),
    )
    assert "Paris" in out[0].text


def test_default_model_int4_is_the_gguf_and_answers():
    """The default model's GGUF is Q4_1: the int4 mode runs those blocks (a layer read back equals
    the fp32 path's dequantized weights) and still answers."""
    from engine.llm import LLM
    from engine.sampling.params import SamplingParams
    from engine.weights import load_weights

    llm = LLM(quantization="int4")
    assert llm.engine.config.dtype == torch.bfloat16
    layer = llm.engine.runner.model.layers[7].self_attn.qkv_proj
    floats = load_weights(llm.source, torch.float32, "cpu").tensors
    p = "model.layers.7.self_attn."
    assert torch.equal(layer.dequantized_weight(), torch.cat([floats[p + f"{n}_proj.weight"] for n in "qkv"]))
    out = llm.chat(
        [{"role": "user", "content": "What is the capital of France?"}],
        SamplingParams(max_tokens=20, temperature=0),
    )
    assert "Paris" in out[0].text
