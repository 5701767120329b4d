"""The op behind every ActTail linear layer, called directly on CPU (no server): its output and the
counters the metrics read, on both CPU paths, under each policy and with a token limit."""

from __future__ import annotations

import pytest
import torch

from acttail_kernels import cpu, reference
from acttail_vllm.serving import op as sparse_op
from acttail_vllm.serving.stats import ModuleStats, TokenPath, new_stats

K, BOUNDS, KEEPS = 16, [0, 8, 12], [4, 10]
#: The largest step that takes the CPU's sparse GEMV at these budgets; larger ones the masked GEMM.
GEMV_ROWS = max(rows for rows in range(1, 100) if cpu.sparse_path(rows, KEEPS, BOUNDS, K) is cpu.CpuPath.SPARSE_GEMV)


def counts(gemv: int = 0, selection: int = 0, unsparsified: int = 0) -> dict[TokenPath, int]:
    return {
        TokenPath.SPARSE_GEMV: gemv,
        TokenPath.SELECTION_DENSE_GEMM: selection,
        TokenPath.UNSPARSIFIED: unsparsified,
    }


def run_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    decode_only: bool,
    max_sparse_tokens: int | None = None,
    stats: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ModuleStats]:
    stats = new_stats(len(KEEPS)) if stats is None else stats
    keep = torch.tensor(KEEPS, dtype=torch.int32)
    thr_guess = torch.zeros(len(KEEPS), dtype=torch.int32)
    policy = "decode" if decode_only else "all"
    y = sparse_op.sparse_linear_impl(
        x,
        cpu.prepare_weight(weight, BOUNDS),
        None,
        BOUNDS,
        KEEPS,
        keep,
        thr_guess,
        stats,
        True,
        policy,
        max_sparse_tokens,
    )
    return y, ModuleStats.read(stats)


@pytest.mark.parametrize("policy", ["all", "auto"])
def test_on_cpu_the_step_size_picks_the_sparse_gemv_the_masked_gemm_or_under_auto_dense(policy):
    """Policy all sparsifies every token, through the GEMV while it reads few enough weight rows
    and the masked GEMM above. Under auto the token limit is the module's measured one: a step
    within it takes the GEMV it was measured with, a larger one the module's dense layer."""
    limit = GEMV_ROWS + 1  # past the masked GEMM's crossover: auto keeps the GEMV it measured
    weight = torch.randn(BOUNDS[-1], K)
    dense_calls = []

    def dense(x, bias):
        dense_calls.append(x.shape[0])
        return x @ weight.T

    stats = new_stats(len(KEEPS))
    steps = (1, GEMV_ROWS, GEMV_ROWS + 1, GEMV_ROWS + 2)
    for rows in steps:
        x = torch.randn(rows, K)
        y = sparse_op.sparse_linear_impl(
            x,
            cpu.prepare_weight(weight, BOUNDS),
            None,
            BOUNDS,
            KEEPS,
            torch.tensor(KEEPS, dtype=torch.int32),
            torch.zeros(2, dtype=torch.int32),
            stats,
            True,
            policy,
            limit if policy == "auto" else None,
            dense,
        )
        is_dense = policy == "auto" and rows > limit
        expected = x @ weight.T if is_dense else reference.sparse_linear_ref(x, weight, None, BOUNDS, KEEPS)
        torch.testing.assert_close(y, expected)
    if policy == "all":
        assert dense_calls == []
        expected_counts = counts(gemv=1 + GEMV_ROWS, selection=2 * GEMV_ROWS + 3)
    else:
        assert dense_calls == [GEMV_ROWS + 2]
        expected_counts = counts(gemv=1 + 2 * GEMV_ROWS + 1, unsparsified=GEMV_ROWS + 2)
    assert ModuleStats.read(stats).tokens == expected_counts


def test_every_row_keeps_its_budget():
    x, weight = torch.randn(5, K), torch.randn(BOUNDS[-1], K)
    y, stats = run_op(x, weight, decode_only=False)
    torch.testing.assert_close(y, reference.sparse_linear_ref(x, weight, None, BOUNDS, KEEPS))
    assert stats.kept_channels == (4 * 5, 10 * 5)
    assert stats.tokens == counts(gemv=5)


def test_decode_policy_leaves_prefill_rows_dense_and_counts_them_whole(monkeypatch):
    decode_rows = torch.tensor([True, False, True, True, False])
    monkeypatch.setattr(sparse_op, "decode_token_mask", lambda rows, device: decode_rows)
    x, weight = torch.randn(5, K), torch.randn(BOUNDS[-1], K)
    y, stats = run_op(x, weight, decode_only=True)
    sparse = reference.sparse_linear_ref(x, weight, None, BOUNDS, KEEPS)
    torch.testing.assert_close(y[decode_rows], sparse[decode_rows])
    torch.testing.assert_close(y[~decode_rows], x[~decode_rows] @ weight.T)
    assert stats.kept_channels == (4 * 3 + K * 2, 10 * 3 + K * 2)
    assert stats.tokens == counts(gemv=3, unsparsified=2)


@pytest.mark.parametrize("decode_only", [False, True])
def test_steps_over_the_token_limit_run_dense(decode_only, monkeypatch):
    """max_sparse_tokens=3: a step of 3 tokens is sparsified, one of 4 runs the dense layer whole
    (under policy=decode too: the decode mask is not even read), and the counters say so."""

    def decode_token_mask(rows, device):
        assert rows <= 3, "a step over the limit read the decode mask"
        return None  # every token of the small step decodes

    monkeypatch.setattr(sparse_op, "decode_token_mask", decode_token_mask)
    weight, stats = torch.randn(BOUNDS[-1], K), new_stats(len(KEEPS))
    small, large = torch.randn(3, K), torch.randn(4, K)
    y_small, _ = run_op(small, weight, decode_only, max_sparse_tokens=3, stats=stats)
    torch.testing.assert_close(y_small, reference.sparse_linear_ref(small, weight, None, BOUNDS, KEEPS))
    y_large, both = run_op(large, weight, decode_only, max_sparse_tokens=3, stats=stats)
    torch.testing.assert_close(y_large, large @ weight.T)
    assert both.kept_channels == (4 * 3 + K * 4, 10 * 3 + K * 4)
    assert both.tokens == counts(gemv=3, unsparsified=4)


@pytest.mark.parametrize("max_sparse_tokens", [None, 0])
def test_cpu_gemms_run_at_few_row_counts_with_exact_rows(max_sparse_tokens, monkeypatch):
    """Steps of 1..300 tokens, sparsified or dense (max_sparse_tokens=0), issue GEMMs at 33 row
    counts, not 300 (oneDNN keeps a kernel per GEMM shape), and each row's output is its own. The
    sparsified steps of up to GEMV_ROWS tokens issue none: the sparse GEMV runs them."""
    gemm_row_counts = set()
    linear = torch.nn.functional.linear

    def recording_linear(x, weight, bias=None):
        gemm_row_counts.add(x.shape[0])
        return linear(x, weight, bias)

    monkeypatch.setattr(torch.nn.functional, "linear", recording_linear)
    weight = torch.randn(BOUNDS[-1], K)
    for rows in range(1, 301):
        x = torch.randn(rows, K)
        y, _ = run_op(x, weight, decode_only=False, max_sparse_tokens=max_sparse_tokens)
        dense = max_sparse_tokens is not None
        expected = x @ weight.T if dense else reference.sparse_linear_ref(x, weight, None, BOUNDS, KEEPS)
        torch.testing.assert_close(y, expected)
    assert len(gemm_row_counts) == (33 if max_sparse_tokens is not None else 33 - GEMV_ROWS)
    assert all(cpu.gemm_rows(rows) < 1.25 * rows for rows in range(1, 8193))


@pytest.mark.parametrize(
    ("policy", "rows", "limit", "faster_up_to", "expected"),
    [
        ("auto", 1, None, 1, TokenPath.SPARSE_GEMV),
        ("auto", 4, None, 1, TokenPath.UNSPARSIFIED),  # the table says dense: not sparsified
        ("all", 4, None, 1, TokenPath.SELECTION_DENSE_GEMM),  # every token, through the fallback
        ("decode", 4, None, 1, TokenPath.SELECTION_DENSE_GEMM),
        ("all", 4, 3, 1, TokenPath.UNSPARSIFIED),  # over the token limit
        # sparse beats the fallback but not the dense layer: auto leaves the step dense, all does not
        ("auto", 1, None, 0, TokenPath.UNSPARSIFIED),
        ("all", 1, None, 0, TokenPath.SPARSE_GEMV),
    ],
)
def test_call_path_on_cuda_follows_the_crossover_table(monkeypatch, policy, rows, limit, faster_up_to, expected):
    """On a GPU whose crossover table runs one token through the sparse GEMV and more through the
    dense fallback (the H200's table at most measured shapes), and where one token's sparse call
    may still be slower than the dense layer (faster_up_to 0)."""
    import acttail_kernels

    def gemv_path(m, n, k, seg_bounds, seg_keep, device):
        return acttail_kernels.GemvPath.LIST if m == 1 else acttail_kernels.GemvPath.DENSE

    monkeypatch.setattr(acttail_kernels, "gemv_path", gemv_path)
    monkeypatch.setattr(acttail_kernels, "largest_faster_step", lambda n, k, seg_bounds, seg_keep, device: faster_up_to)
    sparse_op.call_path.cache_clear()
    path, _ = sparse_op.call_path(rows, 12, K, tuple(BOUNDS), tuple(KEEPS), torch.device("cuda"), policy, limit)
    sparse_op.call_path.cache_clear()
    assert path is expected


@pytest.mark.parametrize("policy", ["auto", "all", "decode"])
@pytest.mark.parametrize("limit", [None, 2, 5])
@pytest.mark.parametrize("faster_up_to", [0, 1, 3])
@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_largest_sparsified_step_bounds_every_step_call_path_sparsifies(
    monkeypatch, policy, limit, faster_up_to, device
):
    """The dense-range pass compiles steps above a module's largest sparsified step without the op:
    ``call_path`` must leave every such step dense and sparsify every step up to it."""
    import acttail_kernels

    monkeypatch.setattr(acttail_kernels, "largest_faster_step", lambda n, k, seg_bounds, seg_keep, dev: faster_up_to)
    monkeypatch.setattr(acttail_kernels, "gemv_path", lambda m, n, k, b, keep, dev: acttail_kernels.GemvPath.WALK)
    sparse_op.call_path.cache_clear()
    dev = torch.device(device)
    largest = sparse_op.largest_sparsified_step(BOUNDS, KEEPS, K, dev, policy, limit)
    for rows in range(1, 40):
        path, _ = sparse_op.call_path(rows, BOUNDS[-1], K, tuple(BOUNDS), tuple(KEEPS), dev, policy, limit)
        assert (path is not TokenPath.UNSPARSIFIED) == (largest is None or rows <= largest), (rows, largest)
    sparse_op.call_path.cache_clear()
    assert largest == (min(faster_up_to, limit or 99) if policy == "auto" and device == "cuda" else limit)


@pytest.mark.parametrize(
    ("policy", "faster_up_to", "expected"), [("auto", 1, True), ("auto", 0, False), ("all", 0, True)]
)
def test_a_module_auto_never_sparsifies_does_not_count_for_all(monkeypatch, policy, faster_up_to, expected):
    """A module whose one-token sparse call the GPU's table says is slower than the dense layer is
    never sparsified under auto; on a GPU the module that counts tokens for all is then another."""
    import acttail_kernels
    from acttail_vllm.serving.linear_method import counting_modules

    monkeypatch.setattr(acttail_kernels, "largest_faster_step", lambda n, k, b, keep, device: faster_up_to)
    sparsified = sparse_op.largest_sparsified_step(BOUNDS, KEEPS, K, torch.device("cuda"), policy, None) != 0
    assert sparsified is expected
    assert counting_modules([sparsified, True, True], on_gpu=True) == [expected, not expected, False]
    assert counting_modules([False, False], on_gpu=True) == [True, False]  # none sparsified: the first
    assert counting_modules([sparsified, True], on_gpu=False) == [sparsified, True]  # on CPU each sparsified one
    assert counting_modules([False, False], on_gpu=False) == [True, False]


@pytest.mark.skipif(
    torch.cuda.is_available(),
    reason="the op is registered for the platform's device, CUDA here: its CUDA route is "
    "test_eager_single_token_calls_replay_a_graph_with_the_same_result",
)
def test_registered_op_runs_the_call_site_its_budget_tensor_has_when_it_runs():
    """Compiled code calls the registered op with tensors only and the op finds the rest by the
    budget tensor when it runs: a graph vLLM's compile cache loads from a server of another budget
    or setting runs this server's."""
    sparse_op.register_sparse_linear_op()
    gen = torch.Generator().manual_seed(0)
    x, weight = torch.randn(3, K, generator=gen), torch.randn(BOUNDS[-1], K, generator=gen)
    keep, guess, stats = torch.tensor(KEEPS, dtype=torch.int32), torch.zeros(2, dtype=torch.int32), new_stats(2)
    every_row = sparse_op.CallSite(BOUNDS, KEEPS, True, "all", None)
    sparse_op.register_call_site(keep, every_row)
    cpu_weight = cpu.prepare_weight(weight, BOUNDS)
    y = torch.ops.acttail.sparse_linear(x, cpu_weight, None, keep, guess, stats)
    torch.testing.assert_close(y, reference.sparse_linear_ref(x, weight, None, BOUNDS, KEEPS))
    assert ModuleStats.read(stats).tokens == counts(gemv=3)  # counted, as the site says

    up_to_two_tokens = sparse_op.CallSite(BOUNDS, KEEPS, True, "all", 2)  # the same module, restarted
    sparse_op.register_call_site(keep, up_to_two_tokens)
    y = torch.ops.acttail.sparse_linear(x, cpu_weight, None, keep, guess, stats)
    torch.testing.assert_close(y, x @ weight.T)  # 3 rows > 2: dense
    assert ModuleStats.read(stats).tokens == counts(gemv=3, unsparsified=3)
    with pytest.raises(RuntimeError, match="no ActTail module registered"):
        torch.ops.acttail.sparse_linear(x, cpu_weight, None, keep.clone(), guess, stats)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_eager_single_token_calls_replay_a_graph_with_the_same_result():
    """Outside vLLM's graphs a sparse-kernel call is captured once per call site and replayed: each
    replay must compute what a direct kernel call computes on its own input."""
    import acttail_kernels

    sparse_op.register_sparse_linear_op()
    k, n, keeps = 1024, 768, [300, 100, 50]
    bounds = [0, 512, 640, 768]
    weight_t = acttail_kernels.prepare_weight(torch.randn(n, k, device="cuda", dtype=torch.bfloat16))
    keep = torch.tensor(keeps, dtype=torch.int32, device="cuda")
    guess = torch.zeros(3, dtype=torch.int32, device="cuda")
    stats = new_stats(3).cuda()
    site = sparse_op.CallSite(bounds, keeps, False, "auto", None)
    sparse_op.register_call_site(keep, site)
    for _ in range(3):  # the first call captures, the others replay
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        y = torch.ops.acttail.sparse_linear(x, weight_t, None, keep, guess, stats)
        expected = acttail_kernels.sparse_linear(x, weight_t, None, bounds, keeps, keep=keep)
        torch.testing.assert_close(y, expected, rtol=0, atol=0)
    assert any(key[0] == weight_t.data_ptr() for key in sparse_op._EAGER_REPLAYS)
