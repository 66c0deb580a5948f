"""The per-step timing file (engine/step_trace.py): one line per step that ran, saying what it ran."""

from __future__ import annotations

import csv

from engine.host import EngineHost
from engine.llm import LLM
from engine.sampling.params import SamplingParams
from engine.step_trace import HEADER


def test_every_step_is_one_line_with_its_rows_and_prefill_tokens(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("BATON_STEP_TRACE", str(tmp_path))
    llm = LLM("dummy:tiny-llama", block_size=4, max_num_batched_tokens=8, max_num_seqs=8)
    host = EngineHost(llm.engine, name="decode/w 1")  # not started: the test drives the engine itself
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14], [20, 21, 22]]  # 13 prompt tokens > one 8-token step
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    for i, p in enumerate(prompts):
        llm.engine.add_request(f"r{i}", p, params)
    steps = 0
    while llm.engine.has_unfinished():
        llm.engine.step()
        steps += 1
    host.engine.step_trace.close()

    path = tmp_path / "decode_w_1.steps.tsv"  # the worker name made safe for a file name
    text = path.read_text()
    assert text.startswith(HEADER)
    rows = list(csv.DictReader(text.splitlines(), delimiter="\t"))
    assert len(rows) == steps
    assert sum(int(r["prefill_tokens"]) for r in rows) == sum(map(len, prompts))
    assert all(int(r["tokens"]) <= 8 for r in rows)  # the step budget held
    assert int(rows[0]["prefill_tokens"]) == 8 and int(rows[-1]["prefill_tokens"]) == 0
    assert sum(int(r["tokens"]) - int(r["prefill_tokens"]) for r in rows) == 2 * (4 - 1)  # decode rows
    assert all(float(r["step_ms"]) >= 0 and float(r["gap_ms"]) >= 0 for r in rows)


def test_no_trace_unless_asked(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("BATON_STEP_TRACE", raising=False)
    llm = LLM("dummy:tiny-llama")
    EngineHost(llm.engine, name="w")
    assert llm.engine.step_trace is None
