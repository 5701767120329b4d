"""The post-grad pass that compiles steps no module sparsifies without the ActTail op
(``acttail_vllm/serving/dense_range.py``), through Inductor on this machine's device."""

from __future__ import annotations

import logging
import os
from types import SimpleNamespace

import pytest
import torch

if not torch.cuda.is_available():
    # torch.compile imports Triton, which builds its language for the interpreter only if this is
    # set first: test_kernels.py, in the same pytest worker, runs the kernels under it
    os.environ.setdefault("TRITON_INTERPRET", "1")

from vllm.config import CompilationMode  # noqa: E402
from vllm.config.utils import Range  # noqa: E402

from acttail_kernels import cpu, prepare_weight  # noqa: E402
from acttail_vllm.serving import op as sparse_op  # noqa: E402
from acttail_vllm.serving.dense_range import DenseRangePass, install_dense_range_pass  # noqa: E402
from acttail_vllm.serving.stats import ModuleStats, TokenPath, new_stats  # noqa: E402

K, BOUNDS, KEEPS = 16, [0, 8, 20], [4, 6]


def two_layers(x, w_uncounted, b_uncounted, keep_uncounted, guess_uncounted, w_counted, keep_counted, guess, stats):
    """One call that counts nothing, then the one that counts (as a GPU's modules pass them)."""
    h = torch.ops.acttail.sparse_linear(x, w_uncounted, b_uncounted, keep_uncounted, guess_uncounted, None)
    return torch.ops.acttail.sparse_linear(torch.relu(h[:, :K]), w_counted, None, keep_counted, guess, stats)


@pytest.mark.parametrize("functionalization_v2", [False, True])  # vLLM compiles with the first
@pytest.mark.parametrize("with_pass", [True, False])
def test_pass_replaces_the_uncounted_call_with_its_gemm_and_keeps_the_counting_one(with_pass, functionalization_v2):
    """Compiled with the pass, the call without counters is the GEMM the op's CUDA route runs on the
    kernel layout [K, N] and the op runs once, for the call that counts the step. On a CPU the
    uncounted site's dense layer stands in for that route (the op would read a CPU layout)."""
    sparse_op.register_sparse_linear_op()  # for the platform's device: CUDA where there is one
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(0)
    w_kernel_layout, bias = torch.randn(K, BOUNDS[-1], generator=gen), torch.randn(BOUNDS[-1], generator=gen)
    w_counted = torch.randn(BOUNDS[-1], K, generator=gen)
    x = torch.randn(5, K, generator=gen)
    expected = torch.relu(torch.addmm(bias, x, w_kernel_layout)[:, :K]) @ w_counted.T
    w_counted = cpu.prepare_weight(w_counted, BOUNDS) if device == "cpu" else prepare_weight(w_counted)
    x, w_kernel_layout, bias = (t.to(device) for t in (x, w_kernel_layout, bias))
    keep_uncounted, keep_counted = (torch.tensor(KEEPS, dtype=torch.int32, device=device) for _ in range(2))
    guess_uncounted = torch.full((2,), 7, dtype=torch.int32, device=device)
    guess, stats = torch.zeros(2, dtype=torch.int32, device=device), new_stats(2).to(device)

    def dense(x, b):  # a CPU's dense layer for the uncounted site
        return torch.addmm(b, x, w_kernel_layout)

    sites = (
        sparse_op.CallSite(BOUNDS, KEEPS, False, "auto", 0, dense),
        sparse_op.CallSite(BOUNDS, KEEPS, True, "auto", 0),
    )
    for keep, site in zip((keep_uncounted, keep_counted), sites):  # held here: the registry holds them weakly
        sparse_op.register_call_site(keep, site)
    dense_range = DenseRangePass(SimpleNamespace(compile_ranges_endpoints=[64]))
    options = {"enable_auto_functionalized_v2": functionalization_v2}
    if with_pass:
        options["post_grad_custom_post_pass"] = dense_range
    compiled = torch.compile(two_layers, backend="inductor", options=options, dynamic=True, fullgraph=True)
    args = (x, w_kernel_layout, bias, keep_uncounted, guess_uncounted, w_counted.to(device), keep_counted)
    compiled(*args, guess, stats)  # compiled outside the profile
    with torch.profiler.profile() as prof:
        y = compiled(*args, guess, stats)

    torch.testing.assert_close(y.cpu(), expected, rtol=1e-4, atol=1e-4)
    assert sum(event.name == "acttail::sparse_linear" for event in prof.events()) == (1 if with_pass else 2)
    assert guess_uncounted.tolist() == [7, 7]
    assert ModuleStats.read(stats.cpu()).tokens[TokenPath.UNSPARSIFIED] == 10  # the counting call, twice


@pytest.mark.parametrize(
    ("largest", "endpoints", "dense_ranges"),
    [
        (1, [2, 8192], [Range(3, 8192)]),  # vLLM takes no endpoint below 2: two-token steps keep the op
        (16, [16, 8192], [Range(17, 8192)]),
        (0, [8192], [Range(1, 8192)]),  # no module ever sparsified: every step
        (None, [8192], []),  # policy all without a limit: steps of any size may be sparsified
        (9000, [8192], []),
    ],
)
def test_bound_splits_the_compile_ranges_at_the_largest_sparsified_step(largest, endpoints, dense_ranges):
    config = SimpleNamespace(compile_ranges_endpoints=[8192])
    dense_range = DenseRangePass(config)
    assert not dense_range.is_applicable_for_range(Range(1, 8192))  # before the budgets: nowhere
    before = dense_range.uuid()
    dense_range.bound(largest, counting_module=0)
    assert config.compile_ranges_endpoints == endpoints
    ranges = [Range(s + 1, e) for s, e in zip([0, *endpoints[:-1]], endpoints)]
    assert [r for r in ranges if dense_range.is_applicable_for_range(r)] == dense_ranges
    assert dense_range.uuid() != before  # vLLM's compile cache keys on the bound
    bound_uuid = dense_range.uuid()
    dense_range.bound(largest, counting_module=3)
    assert dense_range.uuid() != bound_uuid  # and on which module counts


def test_vllm_deep_copies_of_its_inductor_config_hold_the_pass_itself():
    import copy

    dense_range = DenseRangePass(SimpleNamespace(compile_ranges_endpoints=[8192]))
    assert copy.deepcopy({"post_grad_custom_post_pass": dense_range})["post_grad_custom_post_pass"] is dense_range


def test_install_only_where_vllm_compiles_on_a_gpu_and_the_slot_is_free(monkeypatch, caplog):
    from vllm.platforms import current_platform

    def vllm_config(mode, inductor=None):
        return SimpleNamespace(compilation_config=SimpleNamespace(mode=mode, inductor_compile_config=inductor or {}))

    if not torch.cuda.is_available():
        assert install_dense_range_pass(vllm_config(CompilationMode.VLLM_COMPILE)) is None
    monkeypatch.setattr(type(current_platform), "is_cuda_alike", lambda self: True)
    config = vllm_config(CompilationMode.VLLM_COMPILE)
    dense_range = install_dense_range_pass(config)
    assert config.compilation_config.inductor_compile_config == {current_platform.pass_key: dense_range}
    assert install_dense_range_pass(vllm_config(CompilationMode.NONE)) is None  # --enforce-eager
    with caplog.at_level(logging.WARNING):
        assert (
            install_dense_range_pass(vllm_config(CompilationMode.VLLM_COMPILE, {current_platform.pass_key: 1})) is None
        )
    assert "through its op" in caplog.text
