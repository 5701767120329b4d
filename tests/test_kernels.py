"""TopK-sparse linear kernels against their PyTorch reference.

Without CUDA the Triton kernels run in Triton's CPU interpreter (fp32/fp16, small odd shapes; bf16
gives NaN there); with CUDA the same tests run bf16 at full Llama-2 7B/13B shapes. Every kernel
output is poisoned with NaN first, so an element the kernel fails to write fails the test.
"""

from __future__ import annotations

import functools
import itertools
import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the kernels' import

from acttail_kernels import (  # noqa: E402
    kernels_available,
    measured,  # noqa: E402
    prepare_weight,
    reference,
)
from acttail_kernels.crossover import (  # noqa: E402
    CROSSOVER_FILE,
    DEFAULT_MAX_SPARSE_M,
    CrossoverPoint,
    CrossoverTable,
    GemvPath,
    ShapeCrossover,
    load_crossover,
)
from acttail_kernels.gemv_tiles import TILES_FILE, GemvLoop, GemvTiles, ShapeTiles, TileTable, load_tiles  # noqa: E402
from acttail_kernels.measured import MEASURED_DIR, table_path  # noqa: E402

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
DTYPES = [torch.bfloat16] if ON_GPU else [torch.float32, torch.float16]
# (seg_widths, K): a plain projection and merged ones with unequal odd segments.
SHAPES = (
    [
        ((5120,), 5120),
        ((5120, 5120, 5120), 5120),
        ((13824, 13824), 5120),
        ((5120,), 13824),
        ((4096,), 11008),
        ((4096, 1024, 1024), 4096),
        ((3584, 512, 512), 3584),
    ]  # GQA qkv: Llama-3-8B / Mistral-7B, Qwen2.5-7B
    if ON_GPU
    else [((37,), 100), ((11, 13, 9), 100), ((20, 17), 63)]
)
SPARSITIES = [0.0, 0.5, 0.8, 0.95]
TOKENS = [1, 2, 5, 16] if ON_GPU else [1, 3, 16]
# The dense fallback runs one batched GEMM where a merged projection's segments are equally wide.
FALLBACK_SHAPES = SHAPES if ON_GPU else SHAPES + [((12, 12, 12), 40)]


@pytest.fixture(scope="module")
def kernels():
    """The Triton modules, loaded under the interpreter on CPU."""
    if "acttail_kernels.topk_select" in sys.modules and not ON_GPU:
        from acttail_kernels.topk_select import triton_interpreted

        if not triton_interpreted():
            pytest.skip("kernels were imported before TRITON_INTERPRET=1 was set (run this file alone)")
    ok, reason = kernels_available(DEVICE)
    if not ok:
        pytest.skip(reason)
    from acttail_kernels import dispatch, sparse_gemv, topk_select

    return dispatch, sparse_gemv, topk_select


def bounds_of(widths: tuple[int, ...]) -> list[int]:
    return [0] + torch.tensor(widths).cumsum(0).tolist()


def keeps_for(k: int, widths: tuple[int, ...], sparsity: float, seed: int) -> list[int]:
    """One budget per segment near 1 - sparsity, different per segment (merged projections)."""
    return [min(k, max(0, round((1 - sparsity) * k) - 3 * i + seed % 3)) for i in range(len(widths))]


def layer_of(widths: tuple[int, ...], k: int, dtype: torch.dtype) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """A random projection with these output segments over k inputs: its bounds, weight [N, K], bias [N]."""
    bounds = bounds_of(widths)
    weight = (torch.randn(bounds[-1], k) * 0.05).to(dtype).to(DEVICE)
    return bounds, weight, torch.randn(bounds[-1]).to(dtype).to(DEVICE)


def activations(m: int, k: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Random rows with many exact |x| ties (integers, both signs) and zeros in the first quarter."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen)
    x[:, : k // 4] = x[:, : k // 4].mul(2).round()
    return x.to(dtype).to(DEVICE)


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12)).item()


def tolerance(dtype: torch.dtype) -> float:
    return {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]


# --- the reference itself -------------------------------------------------------------------


def test_topk_mask_keeps_exactly_keep_per_row():
    x = torch.randn(7, 50)
    for keep in (0, 1, 17, 50):
        mask = reference.topk_mask(x, keep)
        assert mask.sum(dim=1).tolist() == [keep] * 7
        if 0 < keep < 50:  # every kept |x| >= every dropped |x|
            kept_min = torch.where(mask, x.abs(), torch.inf).min(dim=1).values
            dropped_max = torch.where(mask, -torch.inf, x.abs()).max(dim=1).values
            assert (kept_min >= dropped_max).all()


def test_topk_mask_ties_go_to_lower_index():
    x = torch.tensor([[1.0, -3.0, 2.0, -2.0, 2.0, 0.0, 2.0]])
    assert reference.topk_mask(x, 3).tolist() == [[False, True, True, True, False, False, False]]
    assert reference.topk_mask(torch.zeros(1, 5), 2).tolist() == [[True, True, False, False, False]]


def test_sparse_linear_ref_per_segment_keep():
    x = torch.tensor([[4.0, -1.0, 3.0, 0.5]])
    weight = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    bias = torch.tensor([1.0, 2.0, 3.0])
    out = reference.sparse_linear_ref(x, weight, bias, [0, 1, 3], [1, 3])
    expect_first = 4.0 * weight[0, 0] + 1.0
    expect_rest = (torch.tensor([4.0, -1.0, 3.0, 0.0]) @ weight[1:].T) + bias[1:]  # 0.5 dropped
    assert torch.allclose(out, torch.cat([expect_first.view(1), expect_rest]).view(1, 3))


def test_threshold_linear_ref_per_segment_threshold():
    """An entry equal to its segment's threshold is kept; 0 keeps everything, +inf nothing."""
    x = torch.tensor([[4.0, -1.0, 3.0, 0.5]])
    weight = torch.arange(16, dtype=torch.float32).reshape(4, 4)
    bias = torch.tensor([1.0, 2.0, 3.0, 4.0])
    out = reference.threshold_linear_ref(x, weight, bias, [0, 1, 2, 3, 4], [3.5, 1.0, 0.0, torch.inf])
    kept = torch.tensor([[4.0, 0.0, 0.0, 0.0], [4.0, -1.0, 3.0, 0.0], [4.0, -1.0, 3.0, 0.5], [0.0, 0.0, 0.0, 0.0]])
    assert torch.equal(out[0], (kept * weight).sum(dim=1) + bias)
    with pytest.raises(ValueError, match="one entry per segment"):
        reference.threshold_linear_ref(x, weight, None, [0, 2, 4], [1.0])


@pytest.mark.parametrize(
    ("bounds", "keeps", "message"),
    [
        ([0, 5], [1], "end at the output width"),
        ([0, 2, 2, 6], [1, 1, 1], "strictly increasing"),
        ([0, 3, 6], [1], "one entry per segment"),
        ([0, 6], [5], r"in \[0, 4\]"),
    ],
)
def test_bad_segments_are_rejected(bounds, keeps, message):
    with pytest.raises(ValueError, match=message):
        reference.sparse_linear_ref(torch.randn(2, 4), torch.randn(6, 4), None, bounds, keeps)


# --- the Triton kernels ---------------------------------------------------------------------


@pytest.mark.parametrize("row_chunk", [None, 16], ids=["", "chunks_of_16"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_selection_matches_reference_exactly(kernels, shape, dtype, row_chunk):
    """Also with rows written and listed in many chunks (exact ties in the first quarter of the row
    span several of them)."""
    _, _, topk_select = kernels
    options = topk_select.SelectOptions(row_chunk=row_chunk) if row_chunk else topk_select.SHIPPED_OPTIONS
    widths, k = shape
    for seed, (m, sparsity) in enumerate((m, s) for m in TOKENS for s in SPARSITIES):
        x = activations(m, k, dtype, seed)
        keeps = keeps_for(k, widths, sparsity, seed)
        for with_list in {m == 1, False}:  # one token both ways: with its channel list, and without
            keep_t = topk_select.keep_tensor(keeps, DEVICE)
            sel = topk_select.topk_select(x, keep_t, with_list=with_list, options=options)
            for i, keep in enumerate(keeps):
                expect = torch.where(reference.topk_mask(x, keep), x, 0)
                assert torch.equal(sel.xs[i], expect), f"M={m} s={sparsity} list={with_list} segment {i} keep {keep}"
                if with_list:  # the channel list: nonzero kept entries in order, with their values
                    listed = expect[0].nonzero().flatten()
                    count = int(sel.count[i])
                    assert count == listed.numel()
                    assert torch.equal(sel.idx[i, :count].long(), listed)
                    assert torch.equal(sel.xv[i, :count], expect[0, listed])


def magnitude_bits(v: torch.Tensor) -> int:
    """The bit pattern of |v| (sign cleared), as topk_select orders thresholds."""
    int_type = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}[v.dtype]
    return int(v.abs().view(int_type)) & (0x7FFFFFFF if v.dtype == torch.float32 else 0x7FFF)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_selection_with_a_threshold_guess(kernels, shape, dtype):
    """A guess only narrows the search: the outputs stay exact whether the threshold falls in the
    window (the guess the previous call left) or below it (guess 0) or above it (the top pattern),
    and a windowed search leaves token 0's threshold as the next guess."""
    _, _, topk_select = kernels
    # On the interpreter's 4 "SMs", enough range-test programs for windows.
    options = topk_select.SHIPPED_OPTIONS if ON_GPU else topk_select.SelectOptions(range_programs_per_sm=6)
    widths, k = shape
    guess = topk_select.guess_tensor(len(widths), DEVICE)
    windows = 0
    for seed, (m, sparsity) in enumerate((m, s) for m in TOKENS for s in SPARSITIES):
        x = activations(m, k, dtype, 200 + seed)
        keeps = keeps_for(k, widths, sparsity, seed)
        if seed % 3:  # else keep the previous call's
            guess.fill_(0 if seed % 3 == 1 else (1 << topk_select.value_bits(dtype)) - 1)
        before = guess.clone()
        sel = topk_select.topk_select(
            x, topk_select.keep_tensor(keeps, DEVICE), with_list=m == 1, thr_guess=guess, options=options
        )
        for i, keep in enumerate(keeps):
            expect = torch.where(reference.topk_mask(x, keep), x, 0)
            assert torch.equal(sel.xs[i], expect), f"M={m} s={sparsity} guess {int(before[i])} segment {i} keep {keep}"
            if m == 1:
                assert torch.equal(sel.xv[i, : int(sel.count[i])], expect[0, expect[0].nonzero().flatten()])
        _, _, window = topk_select.range_layout(m, len(widths), k, dtype, topk_select.num_sms(x.device), True, options)
        windows += window
        for i, keep in enumerate(keeps):
            if window and keep > 0:
                kth = x[0].abs().sort(descending=True).values[keep - 1]
                assert int(guess[i]) == magnitude_bits(kth), f"M={m} s={sparsity} segment {i}: guess not updated"
            elif not window:
                assert int(guess[i]) == int(before[i]), f"M={m}: a search without window moved the guess"
    assert windows > 0


def test_selection_reads_budgets_from_the_device_tensor(kernels):
    """Compiled and captured graphs reuse one launch: a budget written into ``keep`` must take effect."""
    _, _, topk_select = kernels
    x = activations(1, 64, torch.float32, 7)
    keep = topk_select.keep_tensor([48], DEVICE)
    for budget in (48, 5):
        keep.fill_(budget)
        sel = topk_select.topk_select(x, keep, with_list=True)
        assert torch.equal(sel.xs[0], torch.where(reference.topk_mask(x, budget), x, 0))
        assert int(sel.count[0]) == int(sel.xs[0].count_nonzero())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_sparse_gemv_matches_reference(kernels, shape, dtype):
    """Both loops: the channel list and the walk over all channels."""
    _, sparse_gemv, topk_select = kernels
    widths, k = shape
    bounds, weight, bias = layer_of(widths, k, dtype)
    weight_t = prepare_weight(weight)
    # Default plans, plus one split over several programs (the ticketed reduction) for each loop;
    # one token both ways: its channel list, and the walk over all channels.
    plans = [None] if ON_GPU else [None, sparse_gemv.GemvPlan(16, 16, 3, 4, 3)]
    for seed, (m, sparsity) in enumerate((m, s) for m in TOKENS for s in SPARSITIES):
        x = activations(m, k, dtype, 100 + seed)
        keeps = keeps_for(k, widths, sparsity, seed)
        ref = reference.sparse_linear_ref(x, weight, bias if seed % 2 else None, bounds, keeps)
        for with_list, plan in itertools.product({m == 1, False}, plans):
            sel = topk_select.topk_select(x, topk_select.keep_tensor(keeps, DEVICE), with_list=with_list)
            out = torch.full((m, bounds[-1]), torch.nan, dtype=dtype, device=DEVICE)
            sparse_gemv.sparse_gemv(sel, weight_t, bias if seed % 2 else None, bounds, plan=plan, out=out)
            where = f"M={m} s={sparsity} list={with_list} plan {plan}"
            assert not out.isnan().any(), f"unwritten outputs at {where}"
            assert rel_err(out, ref) < tolerance(dtype), where


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sparse_linear_every_path(kernels, dtype):
    """Each path sparse_linear can take matches the reference, and by default it takes gemv_path's:
    the sparse GEMV (channel list or walk) for small batches, dense cuBLAS on the sparsified input
    for large ones."""
    dispatch, _, _ = kernels
    widths, k = SHAPES[1]
    bounds, weight, _ = layer_of(widths, k, dtype)
    keeps = keeps_for(k, widths, 0.8, 0)
    chosen = set()
    for m in (1, 2, 16, 24):
        x = activations(m, k, dtype, m)
        ref = reference.sparse_linear_ref(x, weight, None, bounds, keeps)
        chosen.add(dispatch.gemv_path(m, bounds[-1], k, bounds, keeps, x.device))
        paths = [None, GemvPath.DENSE] + ([GemvPath.WALK] if m <= 16 else []) + ([GemvPath.LIST] if m == 1 else [])
        for path in paths:
            out = dispatch.sparse_linear(x, prepare_weight(weight), None, bounds, keeps, path=path)
            assert out.shape == (m, bounds[-1]) and out.dtype == dtype
            assert rel_err(out, ref) < tolerance(dtype), (m, path)
    assert GemvPath.DENSE in chosen and len(chosen) > 1


def test_sparse_linear_passes_select_options_on(kernels):
    """Options change how the selection splits its work, never what it selects."""
    dispatch, _, topk_select = kernels
    widths, k = SHAPES[1]
    bounds, weight, _ = layer_of(widths, k, DTYPES[0])
    weight_t = prepare_weight(weight)
    keeps = keeps_for(k, widths, 0.8, 0)
    guess = topk_select.guess_tensor(len(widths), DEVICE)
    variants = [
        topk_select.SelectOptions(row_chunk=16, row_chunk_max_tokens=16, use_pdl=False),
        topk_select.SelectOptions(range_programs_per_sm=6, threshold_window=1),
    ]
    for options, m in itertools.product(variants, (1, 5)):
        x = activations(m, k, DTYPES[0], m)
        expect = dispatch.sparse_linear(x, weight_t, None, bounds, keeps, path=GemvPath.DENSE)
        out = dispatch.sparse_linear(
            x, weight_t, None, bounds, keeps, path=GemvPath.DENSE, thr_guess=guess, options=options
        )
        assert torch.equal(out, expect), (options, m)


def test_select_options_reject_chunks_triton_cannot_build(kernels):
    _, _, topk_select = kernels
    with pytest.raises(ValueError, match="power of 2"):
        topk_select.SelectOptions(row_chunk=48)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", FALLBACK_SHAPES, ids=str)
def test_dense_fallback_matches_reference(kernels, shape, dtype):
    """cuBLAS on the sparsified input, with a bias: merged projections run one GEMM for all their
    segments up to 16 tokens (batched where the segments are equally wide, else stacked rows) and
    one GEMM per segment above."""
    dispatch, _, _ = kernels
    widths, k = shape
    bounds, weight, bias = layer_of(widths, k, dtype)
    for m in (2, 16, 24):
        x = activations(m, k, dtype, m)
        keeps = keeps_for(k, widths, 0.5, m)
        xs = torch.stack([torch.where(reference.topk_mask(x, keep), x, 0) for keep in keeps])
        out = dispatch.dense_on_sparsified(xs, prepare_weight(weight), bias, bounds)
        ref = reference.sparse_linear_ref(x, weight, bias, bounds, keeps)
        assert out.shape == (m, bounds[-1]) and out.is_contiguous()
        assert rel_err(out, ref) < tolerance(dtype), (widths, m)


# Threshold settings: a sparsity (the threshold an |x| of the input itself, so entries equal to it
# exist), or a fixed threshold: 0 keeps every channel, +inf none.
THRESHOLD_SETTINGS = SPARSITIES + ["zero", "inf"]


def thresholds_for(x: torch.Tensor, num_segs: int, setting: float | str) -> torch.Tensor:
    """float32 [S] on x's device: per segment, the |x| that drops about ``setting`` of x's entries
    (a little less for each later segment, so segments differ), or 0 / +inf."""
    if setting in ("zero", "inf"):
        return torch.full((num_segs,), 0.0 if setting == "zero" else torch.inf, device=x.device)
    magnitudes = x.abs().float().flatten().sort().values
    ranks = [
        min(magnitudes.numel() - 1, max(0, round((setting - 0.05 * i) * magnitudes.numel()))) for i in range(num_segs)
    ]
    return magnitudes[ranks].contiguous()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_threshold_gemv_matches_reference(kernels, shape, dtype):
    """The walk masking the raw x by each segment's threshold, with and without a bias and (on CPU)
    split over several programs (the ticketed reduction)."""
    _, sparse_gemv, _ = kernels
    widths, k = shape
    bounds, weight, bias = layer_of(widths, k, dtype)
    weight_t = prepare_weight(weight)
    plans = [None] if ON_GPU else [None, sparse_gemv.GemvPlan(16, 16, 3, 4, 3)]
    for seed, (m, setting) in enumerate(itertools.product(TOKENS, THRESHOLD_SETTINGS)):
        x = activations(m, k, dtype, 300 + seed)
        thresholds = thresholds_for(x, len(widths), setting)
        with_bias = bias if seed % 2 else None
        ref = reference.threshold_linear_ref(x, weight, with_bias, bounds, thresholds)
        out = torch.full((m, bounds[-1]), torch.nan, dtype=dtype, device=DEVICE)
        plan = plans[seed // 2 % len(plans)]
        sparse_gemv.threshold_gemv(x, thresholds, weight_t, with_bias, bounds, plan=plan, out=out)
        where = f"M={m} thresholds {setting} bias {with_bias is not None} plan {plan}"
        assert not out.isnan().any(), f"unwritten outputs at {where}"
        if setting == "inf":  # no channel kept: the bias alone
            assert torch.equal(out, torch.zeros_like(out) if with_bias is None else with_bias.expand_as(out)), where
        assert rel_err(out, ref) < tolerance(dtype), where


@pytest.mark.parametrize("compact_block", [None, 16], ids=["", "compact_16"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_threshold_list_matches_reference(kernels, shape, dtype, compact_block, monkeypatch):
    """One token, each program compacting its share of the channels into a list first: with and
    without a bias, split over several programs, in several compaction steps (``compact_16``: the
    running count carried across steps), and no channel kept (+inf: the bias alone)."""
    _, sparse_gemv, _ = kernels
    if compact_block is not None:
        monkeypatch.setattr(sparse_gemv, "COMPACT_BLOCK", compact_block)
    widths, k = shape
    bounds, weight, bias = layer_of(widths, k, dtype)
    weight_t = prepare_weight(weight)
    plans = [None] if ON_GPU else [None, sparse_gemv.GemvPlan(16, 16, 3, 4, 3)]
    for seed, (setting, plan) in enumerate(itertools.product(THRESHOLD_SETTINGS, plans)):
        x = activations(1, k, dtype, 600 + seed)
        thresholds = thresholds_for(x, len(widths), setting)
        with_bias = bias if seed % 2 else None
        ref = reference.threshold_linear_ref(x, weight, with_bias, bounds, thresholds)
        out = torch.full((1, bounds[-1]), torch.nan, dtype=dtype, device=DEVICE)
        sparse_gemv.threshold_gemv(x, thresholds, weight_t, with_bias, bounds, plan=plan, out=out, with_list=True)
        where = f"thresholds {setting} bias {with_bias is not None} plan {plan}"
        assert not out.isnan().any(), f"unwritten outputs at {where}"
        if setting == "inf":
            assert torch.equal(out, torch.zeros_like(out) if with_bias is None else with_bias.expand_as(out)), where
        assert rel_err(out, ref) < tolerance(dtype), where


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_threshold_linear_every_path(kernels, dtype):
    """Every path threshold_linear can take matches the reference, and by default it takes
    threshold_path's: the compacted channel list for one token, dense cuBLAS on masked copies above
    the table's batch."""
    dispatch, _, _ = kernels
    widths, k = SHAPES[1]
    bounds, weight, bias = layer_of(widths, k, dtype)
    for m in (1, 2, 24):
        x = activations(m, k, dtype, 400 + m)
        thresholds = thresholds_for(x, len(widths), 0.8)
        ref = reference.threshold_linear_ref(x, weight, bias, bounds, thresholds)
        for path in [None, GemvPath.DENSE] + ([GemvPath.WALK] if m <= 16 else []) + ([GemvPath.LIST] if m == 1 else []):
            out = dispatch.threshold_linear(x, prepare_weight(weight), bias, bounds, thresholds, path=path)
            assert out.shape == (m, bounds[-1]) and out.dtype == dtype
            assert rel_err(out, ref) < tolerance(dtype), (m, path)
    path = functools.partial(dispatch.threshold_path, n=bounds[-1], k=k, device=torch.device(DEVICE))
    assert path(1) is GemvPath.LIST and path(24) is GemvPath.DENSE


def test_threshold_linear_rejects_bad_inputs(kernels):
    dispatch, _, _ = kernels
    x = torch.randn(2, 8, device=DEVICE)
    weight_t = torch.randn(8, 6, device=DEVICE)
    thresholds = torch.ones(2, device=DEVICE)
    with pytest.raises(ValueError, match=r"float32 \[2\]"):
        dispatch.threshold_linear(x, weight_t, None, [0, 3, 6], thresholds.half())
    with pytest.raises(ValueError, match=r"float32 \[2\]"):
        dispatch.threshold_linear(x, weight_t, None, [0, 3, 6], thresholds[:1])
    with pytest.raises(ValueError, match="strictly increasing"):
        dispatch.threshold_linear(x, weight_t, None, [0, 3, 3, 6], torch.ones(3, device=DEVICE))
    with pytest.raises(ValueError, match="bias must be"):
        dispatch.threshold_linear(x, weight_t, torch.randn(5, device=DEVICE), [0, 3, 6], thresholds)
    with pytest.raises(ValueError, match="one token's"):
        dispatch.threshold_linear(x, weight_t, None, [0, 3, 6], thresholds, path=GemvPath.LIST)


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a GPU")
def test_threshold_linear_reads_thresholds_in_a_cuda_graph(kernels):
    """A captured call reads its thresholds from memory at each replay, on every path (the channel
    list: each replay compacts anew, none kept at +inf)."""
    dispatch, _, _ = kernels
    widths, k = SHAPES[1]
    bounds, weight, bias = layer_of(widths, k, torch.bfloat16)
    weight_t = prepare_weight(weight)
    for m, path in ((1, GemvPath.LIST), (1, GemvPath.WALK), (4, GemvPath.WALK), (4, GemvPath.DENSE)):
        x = activations(m, k, torch.bfloat16, 500 + m)
        thresholds = thresholds_for(x, len(widths), 0.5)
        call = functools.partial(dispatch.threshold_linear, x, weight_t, bias, bounds, thresholds, path=path)
        call()  # compile, and allocate the tickets before capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = call()
        for setting in (0.5, 0.95, "zero", "inf", 0.8):
            thresholds.copy_(thresholds_for(x, len(widths), setting))
            out.fill_(torch.nan)
            graph.replay()
            torch.cuda.synchronize()
            ref = reference.threshold_linear_ref(x, weight, bias, bounds, thresholds)
            assert rel_err(out, ref) < tolerance(torch.bfloat16), (m, path, setting)


def test_sparse_linear_rejects_bad_inputs(kernels):
    dispatch, _, _ = kernels
    x = torch.randn(2, 8, device=DEVICE)
    weight_t = torch.randn(8, 6, device=DEVICE)
    with pytest.raises(ValueError, match="prepare_weight"):
        dispatch.sparse_linear(x, weight_t.T, None, [0, 6], [4])
    with pytest.raises(ValueError, match="must share dtype"):
        dispatch.sparse_linear(x.half(), weight_t, None, [0, 6], [4])
    with pytest.raises(ValueError, match="bias must be"):
        dispatch.sparse_linear(x, weight_t, torch.randn(5, device=DEVICE), [0, 6], [4])
    with pytest.raises(ValueError, match=r"1 to 4 output segments"):
        dispatch.sparse_linear(x, weight_t, None, [0, 1, 2, 3, 4, 6], [1] * 5)


def test_kernels_available_explains_cpu_without_interpreter(monkeypatch):
    import acttail_kernels.topk_select as topk_select

    monkeypatch.setattr(topk_select, "triton_interpreted", lambda: False)
    ok, reason = kernels_available("cpu")
    assert not ok and reason.startswith("no Triton/CUDA on this platform")


# --- the crossover table --------------------------------------------------------------------


def test_crossover_lookup():
    table = CrossoverTable(
        device="test",
        shapes=[
            ShapeCrossover(
                name="q",
                n=64,
                k=32,
                points=[
                    CrossoverPoint(sparsity=0.5, max_sparse_m=1, max_faster_m=0, one_token_walk=True),
                    CrossoverPoint(sparsity=0.8, max_sparse_m=4, max_faster_m=2),
                ],
            )
        ],
    )
    walk, dense, channel_list = GemvPath.WALK, GemvPath.DENSE, GemvPath.LIST
    assert table.path(1, 64, 32, 0.3) is walk  # the nearest measured sparsity: 0.5
    assert table.path(2, 64, 32, 0.5) is dense
    assert table.path(2, 64, 32, 0.65) is dense  # a tie goes to the lower sparsity
    assert table.path(2, 64, 32, 0.66) is walk
    assert table.path(4, 64, 32, 0.95) is walk and table.path(5, 64, 32, 0.95) is dense
    assert table.path(1, 64, 32, 0.75) is channel_list  # 0.8 measured the list faster
    assert table.path(1, 128, 32, 0.5) is channel_list  # unmeasured shape: one token, its list
    assert table.path(1 + DEFAULT_MAX_SPARSE_M, 128, 32, 0.5) is dense
    # against the layer left dense (policy auto): up to its own largest batch, never past the fallback's
    assert table.faster_up_to(64, 32, 0.5) == 0  # one token: slower than dense, faster than the fallback
    assert table.faster_up_to(64, 32, 0.8) == 2
    assert table.faster_up_to(128, 32, 0.5) == DEFAULT_MAX_SPARSE_M  # unmeasured: the default batch


def test_one_token_path_follows_the_table(kernels, monkeypatch):
    """One token walks its channel list unless the measured table says the walk is faster."""
    dispatch, _, _ = kernels
    widths, k = SHAPES[0]
    bounds, keeps = bounds_of(widths), keeps_for(k, widths, 0.5, 0)
    sparsity = dispatch.weight_sparsity(k, bounds, keeps)
    point = CrossoverPoint(sparsity=sparsity, max_sparse_m=1, max_faster_m=1, one_token_walk=True)
    table = CrossoverTable(device="test", shapes=[ShapeCrossover(name="s", n=bounds[-1], k=k, points=[point])])
    monkeypatch.setattr(dispatch, "load_crossover", {dispatch.device_name(torch.device(DEVICE)): table}.get)
    path = functools.partial(
        dispatch.gemv_path, n=bounds[-1], k=k, seg_bounds=bounds, seg_keep=keeps, device=torch.device(DEVICE)
    )
    assert path(1) is GemvPath.WALK
    point.one_token_walk = False
    assert path(1) is GemvPath.LIST
    assert path(2) is GemvPath.DENSE
    faster_up_to = functools.partial(
        dispatch.largest_faster_step, n=bounds[-1], k=k, seg_bounds=bounds, seg_keep=keeps, device=torch.device(DEVICE)
    )
    assert faster_up_to() == 1
    point.max_faster_m = 0
    assert faster_up_to() == 0 and path(1) is GemvPath.LIST  # the kernel's choice stands for policy all
    point.max_faster_m = point.max_sparse_m = 1000
    assert faster_up_to() == dispatch.MAX_TOKENS  # never past the sparse GEMV's largest batch


def test_tuner_derives_both_crossovers_and_reads_its_printed_tables(capsys):
    """Where selection + sparse GEMV beat the fallback but not cuBLAS alone (an H100's qkv at 4
    tokens), policy all still takes the sparse GEMV and auto stays dense; the table derives the same
    from the printed kernel table (--from-output)."""
    from benchmarks.bench_kernels import Row, print_kernel_table
    from benchmarks.common import ALL_SHAPES
    from tools.tune_crossover import crossover_table, rows_from_output

    qkv = next(s for s in ALL_SHAPES if s.name == "7b.qkv")
    timings = {1: (39.7, 21.2, 44.2), 2: (39.6, 43.6, 44.4), 4: (39.5, 43.8, 44.3), 8: (39.6, 60.0, 45.0)}
    rows = [Row(qkv, m, 0.8, dense, sparse, fallback, needed=1) for m, (dense, sparse, fallback) in timings.items()]
    rows.append(Row(qkv, 1, 0.5, 39.7, 41.0, 44.0, needed=1, one_token_walk=True))
    table = crossover_table(rows, "GPU")
    assert table.point(qkv.n, qkv.k, 0.8).model_dump() == {
        "sparsity": 0.8,
        "max_sparse_m": 4,
        "max_faster_m": 1,
        "one_token_walk": False,
    }
    assert table.point(qkv.n, qkv.k, 0.5).model_dump() == {
        "sparsity": 0.5,
        "max_sparse_m": 1,
        "max_faster_m": 0,
        "one_token_walk": True,
    }
    print_kernel_table(rows)
    assert crossover_table(rows_from_output("header\n" + capsys.readouterr().out, "out.txt"), "GPU") == table
    with pytest.raises(ValueError, match=r"notes\.txt holds no kernel table \(a\)"):
        rows_from_output("no table here", "notes.txt")


SHIPPED_TABLES = [(CrossoverTable, CROSSOVER_FILE, load_crossover), (TileTable, TILES_FILE, load_tiles)]


def test_shipped_measured_tables_load():
    """Every shipped table parses, sits in the folder of the GPU it names and holds shapes; a GPU
    folder may lack a table (that GPU then gets the defaults for it); a GPU never measured gets the
    defaults for both."""
    folders = sorted(p for p in MEASURED_DIR.iterdir() if p.is_dir())
    assert {"NVIDIA_H100_80GB_HBM3", "NVIDIA_H200"} <= {p.name for p in folders}
    assert (MEASURED_DIR / "NVIDIA_H200" / CROSSOVER_FILE).exists()
    for folder in folders:
        tables = [(model, name, loader) for model, name, loader in SHIPPED_TABLES if (folder / name).exists()]
        assert tables, f"{folder} holds no table"
        for model, name, loader in tables:
            device = model.model_validate_json((folder / name).read_text()).device
            assert table_path(name, device).parent == folder
            assert loader(device).shapes
    assert all(p.max_sparse_m <= 16 for s in load_crossover("NVIDIA H200").shapes for p in s.points)
    assert load_crossover("cpu").shapes == [] and load_tiles("cpu").shapes == []


@pytest.fixture
def measured_tiles(kernels, monkeypatch):
    """plan_gemv reading a test tile table (its plan cache cleared before and after)."""
    _, sparse_gemv, _ = kernels
    table = TileTable(
        device="test",
        shapes=[
            ShapeTiles(
                name="qk",
                seg_widths=[64, 64],
                k=32,
                channel_list=GemvTiles(block_n=64, block_k=256, programs_per_sm=2),
                walk=GemvTiles(block_n=16, block_k=32, programs_per_sm=8),
            )
        ],
    )
    monkeypatch.setattr(sparse_gemv, "load_tiles", {"test GPU": table}.get)
    sparse_gemv.plan_gemv.cache_clear()
    yield sparse_gemv.plan_gemv
    sparse_gemv.plan_gemv.cache_clear()


def test_one_token_plan_follows_the_tile_table(measured_tiles):
    plan_gemv = measured_tiles
    tiled = lambda p: (p.block_n, p.block_k, p.splits)  # noqa: E731
    # 2 tiles: 2 * 4 // 2 splits
    assert tiled(plan_gemv((64, 64), 32, "test GPU", 4, GemvLoop.CHANNEL_LIST)) == (64, 256, 4)
    assert tiled(plan_gemv((64, 64), 32, "test GPU", 4, GemvLoop.TOKEN_WALK)) == (16, 32, 4)  # 8 tiles: 8 * 4 // 8
    assert tiled(plan_gemv((64, 64), 32, "test GPU", 4, GemvLoop.BATCH_WALK)) == (64, 64, 8)  # a batch: the rule
    assert tiled(plan_gemv((64, 64), 48, "test GPU", 4, GemvLoop.CHANNEL_LIST)) == (32, 128, 4)  # unmeasured: the rule


def test_tile_table_rejects_tiles_triton_cannot_build():
    with pytest.raises(ValueError, match="powers of 2, got 48"):
        GemvTiles(block_n=48, block_k=128, programs_per_sm=4)


@pytest.fixture
def measured_dir(tmp_path, monkeypatch):
    """An empty kernels/measured/ and fresh table caches."""
    monkeypatch.setattr(measured, "MEASURED_DIR", tmp_path)
    load_crossover.cache_clear()
    load_tiles.cache_clear()
    yield tmp_path
    load_crossover.cache_clear()
    load_tiles.cache_clear()


LOADERS = pytest.mark.parametrize(
    ("loader", "file_name"), [(load_crossover, CROSSOVER_FILE), (load_tiles, TILES_FILE)], ids=["crossover", "tiles"]
)


@LOADERS
def test_broken_measured_table_says_which_file_and_what_to_do(loader, file_name, measured_dir):
    assert loader("NVIDIA H100 80GB HBM3").shapes == []  # never measured: built-in defaults
    broken = measured_dir / "NVIDIA_H100_80GB_HBM3" / file_name
    broken.parent.mkdir()
    broken.write_text('{"device": "NVIDIA H100 80GB HBM3", "shapes": [{"name": "q"}]}')
    loader.cache_clear()
    with pytest.raises(
        ValueError,
        match=r"NVIDIA_H100_80GB_HBM3/\w+\.json is not a valid \w+Table .*first at "
        r"shapes\.0\.\w+: Field required.*measure it with `python3 -m tools\.tune_\w+ "
        r"--write.*or delete it",
    ):
        loader("NVIDIA H100 80GB HBM3")


@LOADERS
def test_table_of_another_gpu_is_refused(loader, file_name, measured_dir):
    """A table copied into another GPU's folder would tune one GPU with another's timings."""
    misfiled = measured_dir / "NVIDIA_H200" / file_name
    misfiled.parent.mkdir()
    misfiled.write_text('{"device": "NVIDIA H100 80GB HBM3", "shapes": []}')
    with pytest.raises(
        ValueError,
        match=r"measured on 'NVIDIA H100 80GB HBM3', not on 'NVIDIA H200' .*move it to "
        r".*NVIDIA_H100_80GB_HBM3/\w+\.json",
    ):
        loader("NVIDIA H200")
