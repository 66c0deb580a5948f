"""One benchmark invocation: resolve the model, calibrate prompt lengths, probe, then run each sweep
point and return one result dict per point (config fields first, then ``compute_metrics``'s).

Steps:
1. Model id from ``--model`` or the first entry of ``GET /v1/models``.
2. Tokens per word from ``POST /tokenize`` when the server has it (else the word-list default),
   so synthetic prompts land near their requested token lengths.
3. One short probe request; if it fails the run stops with its error instead of producing a
   result full of identical failures (wrong model name, auth, endpoint).
4. Per sweep point: a fresh dataset (seed + point index, so later points do not reuse prompts
   the server has cached from earlier ones), its arrival schedule, dispatch, metrics.

Bounded by construction: each request is bounded by ``timeout_s``, and the last one is sent at the
last arrival offset, so a point ends by (last offset + timeout_s).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

import httpx
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from baton.bench.arrivals import SweepPoint, arrival_offsets, dispatch
from baton.bench.client import (
    EndpointConfig,
    OpenAIStreamClient,
    RequestResult,
    fetch_model_id,
    measure_tokens_per_word,
)
from baton.bench.datasets import DEFAULT_TOKENS_PER_WORD, BenchRequest, DatasetSpec, PromptText, build_dataset
from baton.bench.metrics import METRIC_NAMES, compute_metrics

PROBE_INPUT_LEN = 16
PROBE_OUTPUT_LEN = 4
CALIBRATION_TOKENS = 512
PROBE_SEED_OFFSET = 1_000_003  # keeps the probe prompt out of every point's dataset


class BenchError(RuntimeError):
    """The benchmark cannot run (server unreachable, probe failed); the message says why."""


@dataclass(frozen=True)
class BenchSettings:
    base_url: str
    dataset: DatasetSpec
    points: tuple[SweepPoint, ...]
    model: str | None = None
    endpoint: str = "completions"
    api_key: str | None = None
    num_prompts: int = 1000
    burstiness: float = 1.0
    ignore_eos: bool = False
    temperature: float = 0.0
    seed: int = 0
    timeout_s: float = 300.0
    percentile_metrics: tuple[str, ...] = METRIC_NAMES
    percentiles: tuple[float, ...] = (50.0, 90.0, 99.0)
    goodput_slos: Mapping[str, float] = field(default_factory=dict)
    calibrate_tokens: bool = True
    probe: bool = True
    show_progress: bool = True


async def run_benchmark(settings: BenchSettings, console: Console) -> list[dict]:
    max_connections = max((p.max_concurrency or settings.num_prompts) for p in settings.points) + 1
    async with httpx.AsyncClient(
        timeout=httpx.Timeout(settings.timeout_s, connect=min(10.0, settings.timeout_s)),
        limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
        trust_env=False,  # talk to the server directly, never through an environment proxy
    ) as http:
        model = settings.model or await fetch_model_id(http, settings.base_url, settings.api_key)
        text, ratio_source = await _prompt_text(http, settings, model)
        client = OpenAIStreamClient(
            EndpointConfig(
                base_url=settings.base_url,
                model=model,
                endpoint=settings.endpoint,
                api_key=settings.api_key,
                ignore_eos=settings.ignore_eos,
                temperature=settings.temperature,
                timeout_s=settings.timeout_s,
            ),
            http,
        )
        if settings.probe:
            await _probe(client, text, settings.seed)
        header = _result_header(settings, model, text, ratio_source)
        results = []
        for index, point in enumerate(settings.points):
            requests = build_dataset(settings.dataset, settings.num_prompts, settings.seed + index, text)
            outputs, duration = await _run_point(
                client, requests, point, settings, settings.seed + index, console
            )
            result = {
                **header,
                "request_rate": "inf" if math.isinf(point.request_rate) else point.request_rate,
                "max_concurrency": point.max_concurrency,
            }
            result.update(
                compute_metrics(
                    outputs,
                    duration,
                    settings.percentile_metrics,
                    settings.percentiles,
                    dict(settings.goodput_slos),
                )
            )
            results.append(result)
        return results


def _result_header(settings: BenchSettings, model: str, text: PromptText, ratio_source: str) -> dict:
    """The configuration fields that open every result JSON (vLLM's names where they exist)."""
    return {
        "date": datetime.now(UTC).strftime("%Y%m%d-%H%M%S"),
        "endpoint": settings.endpoint,
        "base_url": settings.base_url,
        "model_id": model,
        "dataset_name": settings.dataset.name,
        "dataset_path": settings.dataset.path,
        "num_prompts": settings.num_prompts,
        "burstiness": settings.burstiness,
        "ignore_eos": settings.ignore_eos,
        "temperature": settings.temperature,
        "seed": settings.seed,
        "tokens_per_word": text.tokens_per_word,
        "tokens_per_word_source": ratio_source,
        "percentile_metrics": list(settings.percentile_metrics),
        "metric_percentiles": list(settings.percentiles),
        "goodput_slos": dict(settings.goodput_slos),
    }


async def _prompt_text(
    http: httpx.AsyncClient, settings: BenchSettings, model: str
) -> tuple[PromptText, str]:
    if settings.calibrate_tokens:
        sample = PromptText(DEFAULT_TOKENS_PER_WORD).make(CALIBRATION_TOKENS, random.Random(settings.seed))
        ratio = await measure_tokens_per_word(http, settings.base_url, model, settings.api_key, sample)
        if ratio is not None:
            return PromptText(ratio), "tokenize"
    return PromptText(DEFAULT_TOKENS_PER_WORD), "default"


async def _probe(client: OpenAIStreamClient, text: PromptText, seed: int) -> None:
    spec = DatasetSpec(name="random", random_input_len=PROBE_INPUT_LEN, random_output_len=PROBE_OUTPUT_LEN)
    (request,) = build_dataset(spec, 1, seed + PROBE_SEED_OFFSET, text)
    result = await client.send(request)
    if not result.success:
        raise BenchError(f"test request failed, not starting the benchmark: {result.error}")


async def _run_point(
    client: OpenAIStreamClient,
    requests: list[BenchRequest],
    point: SweepPoint,
    settings: BenchSettings,
    seed: int,
    console: Console,
) -> tuple[list[RequestResult], float]:
    offsets = arrival_offsets(len(requests), point.request_rate, settings.burstiness, seed)
    concurrency = point.max_concurrency if point.max_concurrency is not None else "none"
    label = f"rate {point.request_rate:g} req/s, max concurrency {concurrency}"
    failures = 0
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("failed {task.fields[failed]}"),
        TimeElapsedColumn(),
        console=console,
        disable=not settings.show_progress,
        transient=False,
    ) as progress:
        task = progress.add_task(label, total=len(requests), failed=0)

        async def send(request: BenchRequest) -> RequestResult:
            nonlocal failures
            result = await client.send(request)
            failures += not result.success
            progress.update(task, advance=1, failed=failures)
            return result

        start = time.perf_counter()
        outputs = await dispatch(requests, offsets, point.max_concurrency, send)
        duration = time.perf_counter() - start
    return outputs, duration
