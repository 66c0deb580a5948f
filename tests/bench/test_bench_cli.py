"""``baton bench`` end to end: flags -> real HTTP load -> JSON, tables and PNG files."""

import argparse
import json

import numpy as np
import pytest
from conftest import Behaviour
from matplotlib.image import imread

from baton.bench.cli import add_arguments, add_parser, run
from baton.bench.plots import plot_configurations

DOCUMENTED_FIELDS = (
    "duration completed failed total_input_tokens total_output_tokens request_throughput output_throughput "
    "total_token_throughput request_goodput mean_ttft_ms median_ttft_ms std_ttft_ms p99_ttft_ms mean_tpot_ms "
    "median_tpot_ms std_tpot_ms p99_tpot_ms mean_itl_ms median_itl_ms std_itl_ms p99_itl_ms mean_e2el_ms "
    "median_e2el_ms std_e2el_ms p99_e2el_ms p50_ttft_ms p90_ttft_ms ttfts itls input_lens output_lens errors "
    "request_rate max_concurrency model_id num_prompts"
).split()
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def bench(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return run(parser.parse_args(["--disable-progress", *argv]))


def assert_png(path) -> None:
    assert path.read_bytes()[:8] == PNG_MAGIC
    pixels = imread(path)
    assert pixels.shape[0] > 100 and pixels.shape[1] > 100
    assert np.std(pixels[..., :3]) > 0.01  # something was drawn


def test_single_run_measures_known_server(sse_server, tmp_path, capsys):
    behaviour = Behaviour(ttft_s=0.1, itl_s=0.02, eos_after=3)
    with sse_server(behaviour) as srv:
        rc = bench(
            "--base-url",
            srv.base_url + "/v1",
            "--endpoint",
            "chat",
            "--dataset-name",
            "random",
            "--random-input-len",
            "20",
            "--random-output-len",
            "10",
            "--num-prompts",
            "8",
            "--max-concurrency",
            "4",
            "--ignore-eos",
            "--goodput",
            "ttft:1000",
            "tpot:1",
            "--result-dir",
            str(tmp_path),
            "--result-filename",
            "run.json",
        )
    assert rc == 0
    result = json.loads((tmp_path / "run.json").read_text())
    assert [f for f in DOCUMENTED_FIELDS if f not in result] == []
    assert result["model_id"] == "fake-model" and result["tokens_per_word_source"] == "tokenize"
    assert (result["completed"], result["failed"]) == (8, 0)
    assert result["output_lens"] == [10] * 8  # ignore_eos honoured: exact lengths
    assert result["input_lens"] == [20] * 8  # calibrated with /tokenize: prompts hit the requested length
    per_request = behaviour.ttft_s + 9 * behaviour.itl_s
    # 8 requests, 4 at a time: two waves, so the run lasts at least two request times.
    assert result["duration"] >= 2 * per_request
    assert result["output_throughput"] == pytest.approx(80 / (2 * per_request), rel=0.2)
    assert result["median_ttft_ms"] == pytest.approx(100, abs=40)
    assert result["median_itl_ms"] == pytest.approx(20, abs=8)
    assert result["median_tpot_ms"] == pytest.approx(20, abs=8)
    assert result["request_goodput"] == 0.0  # every TPOT is ~20 ms, over the 1 ms SLO
    assert all(len(gaps) == 9 for gaps in result["itls"])
    assert_png(tmp_path / "run-cdf.png")
    out = capsys.readouterr().out
    assert "Serving Benchmark Result" in out and "Mean TTFT (ms):" in out and "P90 ITL (ms):" in out


def test_rate_sweep_writes_one_result_per_rate_and_sweep_plot(sse_server, tmp_path, capsys):
    with sse_server(Behaviour(ttft_s=0.02, itl_s=0.005)) as srv:
        rc = bench(
            "--base-url",
            srv.base_url,
            "--dataset-name",
            "prefix-repeat",
            "--prefix-system-len",
            "30",
            "--prefix-turns",
            "2",
            "--num-prompts",
            "6",
            "--request-rate",
            "20,inf",
            "--result-dir",
            str(tmp_path),
            "--result-filename",
            "sweep",
        )
    assert rc == 0
    low, high = (json.loads((tmp_path / f"sweep-rate{r}.json").read_text()) for r in ("20", "inf"))
    assert (low["request_rate"], high["request_rate"]) == (20.0, "inf")
    assert low["completed"] == high["completed"] == 6
    assert max(low["send_times"]) > 0.05 and max(high["send_times"]) < 0.05  # Poisson spacing vs all at once
    summaries = json.loads((tmp_path / "sweep-sweep.json").read_text())
    assert [s["request_rate"] for s in summaries] == [20.0, "inf"]
    assert "ttfts" not in summaries[0] and "p99_ttft_ms" in summaries[0]
    for name in ("sweep-rate20-cdf.png", "sweep-rateinf-cdf.png", "sweep-sweep.png"):
        assert_png(tmp_path / name)
    assert "out tok/s" in capsys.readouterr().out


def test_requests_the_server_rejects_are_counted_as_failed(sse_server, tmp_path, capsys):
    with sse_server(Behaviour(ttft_s=0.01, itl_s=0.002, max_prompt_words=100)) as srv:
        rc = bench(
            "--base-url",
            srv.base_url,
            "--dataset-name",
            "long-mixed",
            "--num-prompts",
            "8",
            "--long-fraction",
            "0.25",
            "--short-input-len",
            "20",
            "--long-input-len",
            "400",
            "--short-output-len",
            "4",
            "--no-tokenize-calibration",
            "--result-dir",
            str(tmp_path),
            "--result-filename",
            "mixed",
            "--no-plots",
        )
    assert rc == 0
    result = json.loads((tmp_path / "mixed.json").read_text())
    assert (result["completed"], result["failed"]) == (6, 2)
    failed_kinds = [k for k, e in zip(result["kinds"], result["errors"], strict=True) if e]
    assert failed_kinds == ["long", "long"]
    assert all(e.startswith("HTTP 400: prompt has 400 words") for e in result["errors"] if e)
    assert result["tokens_per_word_source"] == "default"
    assert result["by_kind"]["long"]["failed"] == 2 and result["by_kind"]["short"]["completed"] == 6
    assert not list(tmp_path.glob("*.png"))
    out = capsys.readouterr().out
    assert "long requests (ok / failed):" in out and "short P99 ITL (ms):" in out


def test_unusable_server_or_flags_give_clear_errors(sse_server, tmp_path, capsys):
    with sse_server(Behaviour()) as srv:
        assert bench("--base-url", srv.base_url, "--model", "nope", "--no-save") == 1
    err = capsys.readouterr().err
    assert "test request failed" in err and "HTTP 404" in err and "nope" in err
    assert bench("--base-url", "http://127.0.0.1:9", "--no-save") == 1
    assert "cannot reach" in capsys.readouterr().err
    assert bench("--goodput", "speed:3") == 2
    assert "goodput" in capsys.readouterr().err
    assert bench("--request-rate", "1,2", "--max-concurrency", "1,2") == 2
    assert bench("--dataset-path", str(tmp_path / "missing.json"), "--dataset-name", "sharegpt") == 2


def test_registers_as_a_subcommand():
    parser = argparse.ArgumentParser(prog="baton")
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", "--request-rate", "2", "--num-prompts", "5"])
    assert args.command == "bench" and args.func is run
    assert (args.request_rate, args.num_prompts, args.endpoint) == ("2", 5, "completions")


def test_configurations_plot_draws_every_configuration(tmp_path):
    # One result per configuration under the same load (disagg_bench.py): ITL tails and TTFT CDFs.
    result = {"dataset_name": "long-mixed", "request_rate": 10.0}
    results = {
        "smooth": dict(result, itls=[[0.006] * 50, [0.007] * 50], ttfts=[0.1, 0.2]),
        "stalling": dict(result, itls=[[0.006] * 48 + [0.2, 0.3], []], ttfts=[0.1, None]),
    }
    path = plot_configurations(results, tmp_path / "disagg.png")
    assert_png(path)
