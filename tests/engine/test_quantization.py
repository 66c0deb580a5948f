"""Int8 weight-only quantization: close to the float layer, and the default model still answers."""

import torch
from torch import nn

from engine.quantization import Int8Linear


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


def test_default_model_int8_answers():
    from engine.llm import LLM
    from engine.sampling.params import SamplingParams

    llm = LLM(quantization="int8")
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}], SamplingParams(max_tokens=20, temperature=0))
    assert "Paris" in out[0].text
