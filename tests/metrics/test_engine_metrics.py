"""Engine-side collection (engine/metrics.py) on a real engine, and the snapshot -> Prometheus mapping."""

from __future__ import annotations

import pytest

from baton.convert import stats_to_proto
from baton.v1 import common_pb2
from baton.worker_metrics import histogram_buckets
from engine.host import EngineHost
from engine.llm import LLM
from engine.metrics import Histogram, KVTransferMetrics, spec_decode_snapshot
from engine.sampling.params import SamplingParams


def test_histogram_uses_prometheus_bucket_semantics() -> None:
    h = Histogram((0.1, 1.0))
    for value in (0.05, 0.1, 0.5, 1.0, 3.0):
        h.observe(value)
    snap = h.snapshot()
    assert snap.bucket_counts == (2, 2, 1)  # a value equal to a bound lands in that bound's bucket
    assert snap.count == 5 and snap.sum == pytest.approx(4.65)
    msg = common_pb2.Histogram(
        upper_bounds=snap.upper_bounds, bucket_counts=snap.bucket_counts, sum=snap.sum, count=snap.count
    )
    assert histogram_buckets(msg) == [("0.1", 2.0), ("1.0", 4.0), ("+Inf", 5.0)]
    with pytest.raises(ValueError):
        Histogram((1.0, 0.5))


@pytest.mark.parametrize(
    "bounds, counts, count",
    [((0.1, 1.0), (1, 1), 2), ((1.0, 0.1), (1, 0, 0), 1), ((0.1,), (1, -1), 0), ((0.1,), (1, 1), 5)],
    ids=["too-few-counts", "unsorted-bounds", "negative-count", "count-mismatch"],
)
def test_malformed_histograms_from_the_network_are_rejected(bounds, counts, count) -> None:
    msg = common_pb2.Histogram(upper_bounds=bounds, bucket_counts=counts, sum=1.0, count=count)
    assert histogram_buckets(msg) is None


def test_kv_transfer_metrics_count_successes_bytes_and_failures() -> None:
    m = KVTransferMetrics()
    m.on_success(0.002, 4096)
    m.on_success(0.2, 1024)
    m.on_failure()
    snap = m.snapshot()
    assert (snap.failures, snap.bytes, snap.time.count) == (1, 5120, 2)
    assert snap.time.sum == pytest.approx(0.202)


def test_engine_counts_prompt_tokens_queue_time_and_preemptions_across_finished_requests() -> None:
    # 8 blocks of 4 tokens cannot hold three sequences growing to 18 tokens: the scheduler preempts.
    llm = LLM("dummy:tiny-llama", block_size=4, num_kv_blocks=8, max_num_seqs=8)
    prompts = [[5 + i, 6 + i, 7 + i, 8 + i, 9 + i, 10 + i] for i in range(3)]
    outs = llm.generate(prompts, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
    assert all(len(o.token_ids) == 12 for o in outs)
    m = llm.engine.metrics
    assert m.num_preemptions > 0  # still counted once the preempted requests have finished
    assert m.num_prompt_tokens == sum(map(len, prompts))  # recomputation after preemption not recounted
    assert m.queue_time.snapshot().count == len(prompts)

    stats = EngineHost(llm.engine).stats()  # what a worker reports (never started: no thread)
    proto = stats_to_proto(stats)
    assert proto.num_preemptions == m.num_preemptions and proto.num_prompt_tokens == m.num_prompt_tokens
    assert proto.request_queue_time_seconds.count == len(prompts)
    assert histogram_buckets(proto.request_queue_time_seconds) is not None
    assert proto.spec_decode_num_drafts == 0  # speculative decoding off


def test_spec_decode_counters_are_read_from_the_engine_dict() -> None:
    class WithSpec:
        spec_stats = {"num_drafts": 3, "num_draft_tokens": 9, "num_accepted_tokens": 5, "other": 1}

    snap = spec_decode_snapshot(WithSpec())
    assert (snap.num_drafts, snap.num_draft_tokens, snap.num_accepted_tokens) == (3, 9, 5)
    assert spec_decode_snapshot(object()).num_drafts == 0


def test_spec_decode_acceptance_per_position_is_exported() -> None:
    from baton.v1 import common_pb2
    from baton.worker_metrics import worker_families

    class WithSpec:
        spec_stats = {"num_drafts": 2, "num_draft_tokens": 6, "num_accepted_tokens": 4, "num_accepted_tokens_per_pos": [2, 1, 1]}

    snap = spec_decode_snapshot(WithSpec())
    assert snap.num_accepted_tokens_per_pos == (2, 1, 1)
    stats = common_pb2.WorkerStats(spec_decode_num_accepted_tokens_per_pos=list(snap.num_accepted_tokens_per_pos))
    info = common_pb2.WorkerInfo(worker_id="d0", role=common_pb2.WORKER_ROLE_DECODE, model_name="m", stats=stats)
    family = next(f for f in worker_families([info]) if f.name == "baton:spec_decode_num_accepted_tokens_per_pos")
    assert {(s.labels["position"], s.value) for s in family.samples if s.name.endswith("_total")} == {("0", 2.0), ("1", 1.0), ("2", 1.0)}
