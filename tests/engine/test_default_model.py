"""The real default model (SmolLM2-135M-Instruct): token-identical to HF transformers, and the CLI answers."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from engine.llm import LLM
from engine.sampling.params import SamplingParams
from engine.weights import load_weights

QUESTIONS = [
    "What is the capital of France?", "Name three primary colors.", "How many legs does a spider have?",
    "Write a haiku about the sea.", "What is 12 times 12?", "Explain photosynthesis in one sentence.",
    "Who wrote Romeo and Juliet?", "Give me a synonym for happy.", "What is the boiling point of water?",
    "Translate 'good morning' into Spanish.", "List the days of the week.", "What is the largest planet?",
    "Describe a cat in five words.", "Why is the sky blue?", "What does CPU stand for?",
    "Suggest a name for a pet fish.", "What is the square root of 81?", "How do I boil an egg?",
    "What language is spoken in Brazil?", "Tell me a fun fact about octopuses.", "What is gravity?",
]


@pytest.fixture(scope="module")
def llm():
    return LLM(device="cpu", max_num_batched_tokens=1024)


@pytest.fixture(scope="module")
def hf(llm):
    from transformers import LlamaConfig, LlamaForCausalLM

    weights = load_weights(llm.source, torch.float32, "cpu")
    model = LlamaForCausalLM(LlamaConfig(**weights.hf_config)).eval()
    model.load_state_dict(weights.tensors, strict=False)
    model.tie_weights()
    return model


def test_greedy_chat_identical_to_hf(llm, hf):
    convs = [[{"role": "user", "content": q}] for q in QUESTIONS]
    sp = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
    ours = llm.chat(convs, sp)
    for conv, out in zip(convs, ours, strict=True):
        prompt = llm.render_chat(conv)
        with torch.inference_mode():
            ref = hf.generate(torch.tensor([prompt]), max_new_tokens=64, do_sample=False, eos_token_id=None, pad_token_id=0)
        assert out.token_ids == ref[0, len(prompt):].tolist(), conv[0]["content"]
    llm.engine.check_integrity()


def test_per_step_logits_match_hf(llm, hf):
    """Every step's logits (prefill's last row, then each decode step) within 1e-4 of HF's."""
    from tests.engine.helpers import RecordingSampler

    recorder = RecordingSampler()
    original, llm.engine.runner.sampler = llm.engine.runner.sampler, recorder
    try:
        convs = [[{"role": "user", "content": q}] for q in QUESTIONS[:3]]
        outs = llm.chat(convs, SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True))
    finally:
        llm.engine.runner.sampler = original
    for conv, out in zip(convs, outs, strict=True):
        prompt = llm.render_chat(conv)
        with torch.inference_mode():
            ref = hf.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0,
                              output_logits=True, return_dict_in_generate=True)
        ours = recorder.logits[out.request_id]
        assert len(ours) == len(ref.logits) == 16
        for step, (a, b) in enumerate(zip(ours, ref.logits, strict=True)):
            diff = (a - b[0].float()).abs().max().item()
            assert diff < 1e-4, f"step {step}: logits differ by {diff}"


def test_answers_sensibly(llm):
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}], SamplingParams(max_tokens=32, temperature=0.0))
    assert "Paris" in out[0].text
    assert out[0].finish_reason == "stop"


def test_stop_strings_cut_text(llm):
    sp = SamplingParams(max_tokens=40, temperature=0.0, stop=("Paris",))
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}], sp)[0]
    assert out.finish_reason == "stop" and "Paris" not in out.text and out.text
    sp = SamplingParams(max_tokens=40, temperature=0.0, stop=("Paris",), include_stop_str_in_output=True)
    assert llm.chat([{"role": "user", "content": "What is the capital of France?"}], sp)[0].text.endswith("Paris")
    llm.engine.check_integrity()


def test_cli_generate_answers():
    proc = subprocess.run(
        [sys.executable, "-m", "baton", "generate", "What is the capital of France?", "--max-tokens", "32"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout
