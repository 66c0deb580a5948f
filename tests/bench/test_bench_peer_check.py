"""peer_check: reading both tools' reports, the comparison, and the command lines it runs.

The report layouts below carry only the keys peer_check reads, at the paths where GuideLLM 0.8
and ``baton bench`` write them. ``test_against_real_guidellm`` runs the real tool when it is
installed (BATON_GUIDELLM=path/to/guidellm, BATON_PEER_TOKENIZER=local tokenizer dir).
"""

import json
import os
from pathlib import Path

import pytest
from conftest import Behaviour

from baton.bench.peer_check import (
    Comparison,
    PeerNumbers,
    baton_command,
    build_parser,
    compare,
    format_comparison,
    guidellm_command,
    main,
    parse_baton_result,
    parse_guidellm_result,
)


def guidellm_report(ttft_mean: float, ttft_median: float, out_tps: float, ok: int, errored: int) -> dict:
    def dist(mean: float, median: float) -> dict:
        return {"mean": mean, "median": median, "percentiles": {"p99": median * 2}}

    zero = dist(0.0, 0.0)
    return {
        "metadata": {},
        "benchmarks": [
            {
                "metrics": {
                    "time_to_first_token_ms": {"successful": dist(ttft_mean, ttft_median), "errored": zero},
                    "output_tokens_per_second": {"successful": dist(out_tps, out_tps * 0.9), "errored": zero},
                    "request_totals": {
                        "successful": ok,
                        "errored": errored,
                        "incomplete": 0,
                        "total": ok + errored,
                    },
                }
            }
        ],
    }


def test_parse_guidellm_report(tmp_path):
    path = tmp_path / "g.json"
    path.write_text(json.dumps(guidellm_report(105.2, 103.9, 158.4, 39, 1)))
    assert parse_guidellm_result(path) == PeerNumbers("guidellm", 105.2, 103.9, 158.4, 39, 1)
    path.write_text(json.dumps({"benchmarks": []}))
    with pytest.raises(ValueError, match="no benchmark"):
        parse_guidellm_result(path)


def test_parse_baton_report(tmp_path):
    path = tmp_path / "b.json"
    path.write_text(
        json.dumps(
            {
                "mean_ttft_ms": 108.6,
                "median_ttft_ms": 108.4,
                "output_throughput": 162.8,
                "completed": 40,
                "failed": 0,
            }
        )
    )
    assert parse_baton_result(path) == PeerNumbers("baton bench", 108.6, 108.4, 162.8, 40, 0)


def test_compare_ratios_and_tolerance():
    ours = PeerNumbers("baton bench", 109.0, 100.0, 91.0, 40, 0)
    peer = PeerNumbers("guidellm", 100.0, 100.0, 100.0, 40, 0)
    rows = compare(ours, peer)
    assert [r.metric for r in rows] == ["mean TTFT (ms)", "median TTFT (ms)", "output throughput (tok/s)"]
    assert [r.ratio for r in rows] == pytest.approx([1.09, 1.0, 0.91])
    assert [r.within(0.10) for r in rows] == [True, True, True]
    assert [r.within(0.05) for r in rows] == [False, True, False]
    assert Comparison("x", 1.0, 0.0).within(0.5) is False
    table = format_comparison(ours, peer, rows, 0.05)
    assert "1.090  NO" in table and "1.000  yes" in table and "40 / 0" in table


def test_command_lines_describe_the_same_load(tmp_path):
    args = build_parser().parse_args(
        ["--tokenizer", "/models/tok", "--concurrency", "8", "--num-requests", "50", "--input-len", "256",
         "--output-len", "32", "--endpoint", "chat", "--guidellm", "/venv/bin/guidellm"]
    )  # fmt: skip
    args.base_url = "http://127.0.0.1:8000"
    ours = baton_command(args, "m", tmp_path)
    assert ours[1:3] == ["-m", "baton.bench"]
    assert "--ignore-eos" in ours
    for flag, value in {
        "--max-concurrency": "8",
        "--num-prompts": "50",
        "--random-input-len": "256",
        "--random-output-len": "32",
        "--endpoint": "chat",
        "--model": "m",
    }.items():
        assert ours[ours.index(flag) + 1] == value, flag
    peer = guidellm_command(args, "m", tmp_path / "g.json")
    assert peer[:2] == ["/venv/bin/guidellm", "run"]
    assert peer[peer.index("--profile") + 1] == "kind=concurrent,streams=8"
    assert peer[peer.index("--constraint") + 1] == "kind=max_requests,count=50"
    assert peer[peer.index("--data") + 1] == "kind=synthetic_text,prompt_tokens=256,output_tokens=32"
    assert peer[peer.index("--tokenizer") + 1] == "kind=huggingface_auto,model=/models/tok"
    backend = peer[peer.index("--backend") + 1].split(",")
    assert "request_format=/v1/chat/completions" in backend and "model=m" in backend
    assert "target=http://127.0.0.1:8000" in backend


@pytest.mark.slow
def test_against_real_guidellm(sse_server, tmp_path, capsys):
    guidellm, tokenizer = os.environ.get("BATON_GUIDELLM"), os.environ.get("BATON_PEER_TOKENIZER")
    if not (guidellm and Path(guidellm).exists() and tokenizer and Path(tokenizer).is_dir()):
        pytest.skip("set BATON_GUIDELLM and BATON_PEER_TOKENIZER to run the real peer tool")
    with sse_server(Behaviour(ttft_s=0.1, itl_s=0.02, tokenize_tokens_per_word=1.0)) as srv:
        rc = main(
            ["--base-url", srv.base_url, "--guidellm", guidellm, "--tokenizer", tokenizer, "--concurrency", "4",
             "--num-requests", "24", "--input-len", "64", "--output-len", "20", "--work-dir", str(tmp_path)]
        )  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "output throughput (tok/s)" in out
