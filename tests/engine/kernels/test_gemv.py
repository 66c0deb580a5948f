"""Few-row GEMV against its torch reference, and the per-shape GEMV / F.linear dispatch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import engine.gemv_dispatch as gemv_dispatch
from engine.gemv_dispatch import GemvDispatch, GemvLinear, GemvShape, install_gemv
from engine.kernels.gemv import MAX_ROWS, GemvConfig, gemv, gemv_config, gemv_ref
from tests.engine.kernels.paged_cases import TOLERANCE, rel_err, requires_cuda


def _inputs(device, dtype, m, n, k, bias):
    x = torch.randn(m, k, device=device).to(dtype)
    w = (torch.randn(n, k, device=device) / k**0.5).to(dtype)
    b = torch.randn(n, device=device).to(dtype) if bias else None
    return x, w, b


def _check(device, dtype, m, n, k, bias, config=None):
    x, w, b = _inputs(device, dtype, m, n, k, bias)
    y = gemv(x, w, b, config=config)
    assert y.shape == (m, n) and y.dtype == dtype
    assert rel_err(y, gemv_ref(x, w, b)) <= TOLERANCE[dtype], (m, n, k, bias, config)


# Small enough for the CPU interpreter. N and K include 1, odd sizes, and non-multiples of every
# block size; each M in 1..4 meets each shape with and without bias.
SMALL_SHAPES = [(1, 1), (7, 33), (37, 100), (19, 1000), (64, 512)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("n", "k"), SMALL_SHAPES)
@pytest.mark.parametrize("m", [1, 2, 3, 4])
def test_gemv_matches_reference_small(device, dtype, m, n, k):
    _check(device, dtype, m, n, k, bias=(m + n) % 2 == 0)
    _check(device, dtype, m, n, k, bias=(m + n) % 2 == 1)


@pytest.mark.parametrize(
    "config",
    [
        GemvConfig(block_n=4, block_k=64, split_k=3),  # split-K, last split shorter, K not a tile multiple
        GemvConfig(block_n=2, block_k=128, split_k=16),  # more splits asked than K has tiles
        GemvConfig(block_n=64, block_k=16, split_k=1),  # a block wider than N
        GemvConfig(block_n=1, block_k=256, split_k=2, num_warps=2),
    ],
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gemv_tile_configs_small(device, dtype, config):
    _check(device, dtype, 3, 37, 700, True, config)
    _check(device, dtype, 1, 5, 512, False, config)


def test_gemv_strided_inputs(device):
    """A row-strided x and a weight that is a column slice of a wider matrix (row stride > K)."""
    x_big = torch.randn(2, 300, device=device)
    w_big = torch.randn(50, 400, device=device)
    x, w = x_big[:, 10:210], w_big[:, :200]
    assert x.stride(0) == 300 and w.stride(0) == 400
    y = gemv(x, w, config=GemvConfig(block_n=8, block_k=64, split_k=2))
    assert rel_err(y, gemv_ref(x, w)) <= TOLERANCE[torch.float32]


def test_gemv_empty_dims(device):
    w = torch.randn(3, 0, device=device)
    b = torch.randn(3, device=device)
    assert torch.equal(gemv(torch.randn(2, 0, device=device), w, b), b.expand(2, 3))
    assert torch.equal(gemv(torch.randn(2, 0, device=device), w), torch.zeros(2, 3, device=device))
    assert gemv(torch.randn(0, 4, device=device), torch.randn(3, 4, device=device)).shape == (0, 3)


def test_gemv_splits_are_deterministic(device):
    x, w, b = _inputs(device, torch.bfloat16, 2, 40, 900, True)
    cfg = GemvConfig(block_n=4, block_k=64, split_k=5)
    first = gemv(x, w, b, config=cfg)
    for _ in range(3):
        assert torch.equal(gemv(x, w, b, config=cfg), first)


def test_gemv_rejects_bad_inputs(device):
    x = torch.randn(2, 8, device=device)
    w = torch.randn(4, 8, device=device)
    with pytest.raises(ValueError, match="weight must have dtype"):
        gemv(x, w.half())
    with pytest.raises(ValueError, match="x has K=8 columns"):
        gemv(x, torch.randn(4, 9, device=device))
    with pytest.raises(ValueError, match="bias has 3 entries"):
        gemv(x, w, torch.randn(3, device=device))
    with pytest.raises(ValueError, match="bias must have dtype"):
        gemv(x, w, torch.randn(4, device=device).half())
    with pytest.raises(ValueError, match="contiguous in its last dim"):
        gemv(x, torch.randn(8, 4, device=device).t())
    with pytest.raises(ValueError, match=f"at most {MAX_ROWS} rows"):
        gemv(torch.randn(MAX_ROWS + 1, 8, device=device), w)
    with pytest.raises(ValueError, match="x must have 2 dims"):
        gemv(torch.randn(8, device=device), w)
    with pytest.raises(ValueError, match="power of two"):
        GemvConfig(block_n=3, block_k=64)


LLAMA_DECODE_SHAPES = [
    (2048, 2048),
    (3072, 2048),
    (2048, 8192),
    (16384, 2048),
    (4096, 4096),
    (4096, 14336),
    (128256, 4096),
]


@pytest.mark.parametrize(("n", "k"), LLAMA_DECODE_SHAPES)
@pytest.mark.parametrize("elem_size", [2, 4])
@pytest.mark.parametrize("m", [1, 2, 4])
def test_gemv_config_table(m, n, k, elem_size):
    """On a 132-SM card: one row gets >= 2 programs per SM; CUDA-core accumulators stay within 64
    registers a thread; three tensor-core stages fit in shared memory; no split is empty."""
    cfg = gemv_config(m, n, k, elem_size=elem_size, num_sms=132)
    programs = -(-n // cfg.block_n) * cfg.split_k
    if m == 1:
        assert programs >= 2 * 132, cfg
    if cfg.tensor_cores:
        assert cfg.num_stages * (cfg.block_n + 16) * cfg.block_k * elem_size <= 200 * 1024, cfg
    else:
        assert m * cfg.block_n * cfg.block_k <= 64 * 32 * cfg.num_warps, cfg
        assert cfg.block_k * elem_size >= 16 * 32, cfg  # a 16-byte load for every thread of a warp
    assert k // cfg.split_k >= cfg.block_k, cfg


# --- dispatch ------------------------------------------------------------------------------
def _fake_measure(faster: set[tuple[int, int, int]]):
    """A stand-in for CUDA-event timing: the GEMV 'wins' exactly on the listed (m, n, k)."""
    seen = []

    def measure(shape, weight):
        seen.append((shape, weight))
        return (1.0, 2.0) if (shape.m, shape.n, shape.k) in faster else (2.0, 1.0)

    measure.seen = seen
    return measure


def test_dispatch_routes_prepared_shapes_only(device, monkeypatch):
    calls = []

    def spy_gemv(x, w, b=None):
        calls.append(tuple(x.shape))
        return gemv(x, w, b)

    monkeypatch.setattr(gemv_dispatch, "gemv", spy_gemv)
    dispatch = GemvDispatch(device, measure=_fake_measure({(1, 24, 64)}))
    w = torch.randn(24, 64, device=device)
    dtype = torch.float32
    new = dispatch.prepare(
        [GemvShape(1, 24, 64, dtype), GemvShape(2, 24, 64, dtype), GemvShape(8, 24, 64, dtype)]
    )
    assert [(c.shape.m, c.use_gemv) for c in new] == [(1, True), (2, False)]  # m=8 > max_rows: skipped
    assert dispatch.prepare([GemvShape(1, 24, 64, dtype)]) == []  # already prepared

    for m in (1, 2, 3, 8):
        x = torch.randn(m, 64, device=device)
        assert rel_err(dispatch.linear(x, w), F.linear(x, w)) <= TOLERANCE[dtype]
    assert calls == [(1, 64)], "only the prepared shape measured faster may take the GEMV"
    # The key includes the bias: with a bias the shape was never prepared, so F.linear serves it.
    dispatch.linear(torch.randn(1, 64, device=device), w, torch.randn(24, device=device))
    assert calls == [(1, 64)]


def test_install_gemv_keeps_parameters_and_names(device, monkeypatch):
    model = nn.Sequential(
        nn.Linear(64, 24, bias=True), nn.ReLU(), nn.Sequential(nn.Linear(24, 16, bias=False))
    )
    model = model.to(device)
    names_before = [n for n, _ in model.named_parameters()]
    params_before = list(model.parameters())
    xs = [torch.randn(m, 64, device=device) for m in (1, 4, 9)]
    want = [model(x) for x in xs]

    measure = _fake_measure({(1, 24, 64), (1, 16, 24), (4, 16, 24)})
    dispatch = GemvDispatch(device, measure=measure)
    assert install_gemv(model, dispatch) == 2
    assert install_gemv(model, dispatch) == 0
    assert isinstance(model[0], GemvLinear) and isinstance(model[2][0], GemvLinear)
    assert [n for n, _ in model.named_parameters()] == names_before
    assert all(a is b for a, b in zip(model.parameters(), params_before, strict=True))
    assert model[2][0].bias is None and "bias" in model[2][0]._parameters

    new = dispatch.prepare_modules(model, rows=(1, 4))
    assert {(c.shape.m, c.shape.n, c.shape.k, c.shape.has_bias) for c in new} == {
        (1, 24, 64, True), (4, 24, 64, True), (1, 16, 24, False), (4, 16, 24, False),
    }  # fmt: skip
    assert all(w is not None for _, w in measure.seen), "timing must use the model's own weights"

    calls = []
    monkeypatch.setattr(gemv_dispatch, "gemv", lambda x, w, b=None: calls.append(x.shape[0]) or gemv(x, w, b))
    for x, y in zip(xs, want, strict=True):
        assert rel_err(model(x), y) <= 1e-5
    assert calls == [1, 1, 4]  # M=1 through both linears, M=4 through the second only, M=9 never


def test_dispatch_needs_cuda_to_time():
    with pytest.raises(ValueError, match="CUDA device"):
        GemvDispatch("cpu")


# --- GPU -----------------------------------------------------------------------------------
GPU_SHAPES = [
    (2048, 2048),
    (3072, 2048),
    (2048, 8192),
    (4096, 4096),
    (6144, 4096),
    (1000, 3000),
    (4099, 1001),
    (513, 14336),
]


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(("n", "k"), GPU_SHAPES)
@pytest.mark.parametrize("m", [1, 2, 3, 4])
def test_gemv_gpu(device, dtype, m, n, k):
    _check(device, dtype, m, n, k, bias=False)
    _check(device, dtype, m, n, k, bias=True)


@pytest.mark.gpu
@requires_cuda
def test_gemv_gpu_large_vocab(device):
    _check(device, torch.bfloat16, 1, 128256, 2048, bias=False)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("config", [None, GemvConfig(block_n=4, block_k=512, split_k=4)])
def test_gemv_cuda_graph_replay(device, config):
    """Captured once, replayed on new inputs written in place: same values as eager, bit for bit."""
    x, w, b = _inputs(device, torch.bfloat16, 1, 2048, 8192, True)
    gemv(x, w, b, config=config)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = gemv(x, w, b, config=config)
    for _ in range(3):
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(y, gemv(x, w, b, config=config))


@pytest.mark.gpu
@requires_cuda
def test_dispatch_gpu_measures_and_captures(device):
    dispatch = GemvDispatch(device, reps=5, warmup=2)
    w = torch.randn(2048, 2048, device=device, dtype=torch.bfloat16)
    shapes = [GemvShape(m, 2048, 2048, torch.bfloat16) for m in (1, 4)]
    choices = dispatch.prepare(shapes, weights={(2048, 2048, torch.bfloat16): w})
    assert [c.shape for c in choices] == shapes
    assert all(c.gemv_us > 0 and c.torch_us > 0 and c.use_gemv == (c.gemv_us < c.torch_us) for c in choices)

    x = torch.randn(1, 2048, device=device, dtype=torch.bfloat16)
    x_new = torch.randn(1, 4096, device=device, dtype=torch.bfloat16)  # never prepared: F.linear
    w_new = torch.randn(64, 4096, device=device, dtype=torch.bfloat16)
    dispatch.linear(x, w)
    dispatch.linear(x_new, w_new)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = dispatch.linear(x, w)
        y_new = dispatch.linear(x_new, w_new)
        with pytest.raises(RuntimeError, match="before CUDA-graph capture"):
            dispatch.prepare([GemvShape(2, 2048, 2048, torch.bfloat16)])
    graph.replay()
    torch.cuda.synchronize()
    assert rel_err(y, gemv_ref(x, w)) <= 1e-2
    assert rel_err(y_new, gemv_ref(x_new, w_new)) <= 1e-2


@pytest.mark.gpu
@requires_cuda
def test_engine_decode_graphs_with_gemv_match_plain_linears():
    """A tiny Llama engine whose linears all go through the GEMV (forced, so the path runs even
    where cuBLAS would win), prepared before any graph is captured: greedy tokens of 1-, 2- and
    4-sequence decode graph steps equal those of the unchanged engine, logits within fp32 noise."""
    from engine.builder import build_engine
    from engine.config import CacheConfig, SchedulerConfig
    from engine.sampling.params import SamplingParams
    from tests.engine.helpers import RecordingSampler, random_prompts, run_all
    from tests.engine.oracle import TINY_LLAMA, hf_model, hf_weights

    cfg = dict(TINY_LLAMA, vocab_size=1000, hidden_size=256, intermediate_size=512, num_attention_heads=4)
    weights = {k: v.detach().clone() for k, v in hf_weights(hf_model(cfg)).items()}
    prompts = random_prompts(4, cfg["vocab_size"], 5, 40, seed=3)
    sampling = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    results = []
    for use_gemv in (False, True):
        eng = build_engine(
            cfg, weights, dtype=torch.float32, device="cuda", cache=CacheConfig(block_size=16, num_blocks=128),
            scheduler=SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64), capture_graphs=False,
        )  # fmt: skip
        eng.runner.sampler = RecordingSampler()
        # The runner put every linear on its own measured dispatch at load; rebind them to one whose
        # choice is forced: always F.linear (the plain engine) or always the GEMV.
        linears = [m for m in eng.runner.model.modules() if isinstance(m, GemvLinear)]
        assert len(linears) == 4 * cfg["num_hidden_layers"] + 1
        assert install_gemv(eng.runner.model, eng.runner.gemv) == 0  # nothing left to replace
        forced = (0.0, 1.0) if use_gemv else (1.0, 0.0)
        dispatch = GemvDispatch("cuda", measure=lambda shape, weight, forced=forced: forced)
        for m in linears:
            m.dispatch = dispatch
        assert all(c.use_gemv == use_gemv for c in dispatch.prepare_modules(eng.runner.model))
        outs = {}
        for subset in (1, 2, 4):  # each subset decodes from the bucket of its size
            part = {f"{subset}/{rid}": p for rid, p in list(prompts.items())[:subset]}
            outs.update(run_all(eng, part, sampling))
        assert {1, 2, 4} <= set(eng.runner.graphs.graphs)
        results.append((outs, eng.runner.sampler.logits))
    (plain, plain_logits), (fast, fast_logits) = results
    assert fast == plain
    for rid, rows in plain_logits.items():
        assert rel_err(torch.stack(fast_logits[rid]), torch.stack(rows)) <= 1e-4, rid
