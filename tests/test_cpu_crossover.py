"""Policy auto on a CPU: the startup race between each module's sparse GEMV and vLLM's dense layer,
and what the modules do with its result (no server). vLLM is imported inside the tests: importing it
on a CPU turns Triton off for the process, and the Triton interpreter tests share the worker."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from acttail_kernels import reference
from acttail_vllm.dev.cpu_module import cpu_sparse_module
from acttail_vllm.serving.budgets import DecoderProjection, ModuleBudget
from acttail_vllm.serving.cpu_crossover import TimedModule, largest_faster_steps
from acttail_vllm.serving.settings import ActTailSettings


class FakeClock:
    """A clock that only the timed calls move, by what each is told to cost."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def costed(clock: FakeClock, cost, calls: list[int]):
    def run(x: torch.Tensor) -> None:
        calls.append(x.shape[0])
        clock.now += cost(x.shape[0], len(calls))

    return run


def test_each_module_is_sparsified_up_to_the_largest_step_its_gemv_won_at_every_size_to():
    clock = FakeClock()
    calls: dict[str, list[int]] = {name: [] for name in ("narrow", "slow", "wide", "noisy")}
    dense_cost = {"narrow": 25.0, "slow": 25.0, "wide": 100.0, "noisy": 25.0}
    sparse_cost = {
        "narrow": lambda rows, n: 10.0 * rows,  # wins at 1 and 2, loses at 4
        "slow": lambda rows, n: 30.0,  # loses at once
        "wide": lambda rows, n: 1.0 * rows,  # wins at every size tried
        "noisy": lambda rows, n: 1000.0 if n == 3 else 5.0,  # one slow round of five: the median wins
    }
    modules = [
        TimedModule(
            in_features=8,
            sparse=costed(clock, sparse_cost[name], calls[name]),
            dense=costed(clock, lambda rows, n, name=name: dense_cost[name], []),
        )
        for name in calls
    ]
    assert largest_faster_steps(modules, torch.float32, rounds=5, clock=clock) == [2, 0, 16, 16]
    assert calls["slow"] == [1] * 5  # not tried again once it lost
    assert calls["narrow"] == [1] * 5 + [2] * 5 + [4] * 5
    assert calls["wide"] == [rows for rows in (1, 2, 4, 8, 16) for _ in range(5)]


def cpu_module(layer_index: int, out_sizes: list[int], k: int, gen: torch.Generator):
    """A vLLM-like CPU gate_up layer with its ActTail state, as the linear method leaves it after loading."""
    proj = DecoderProjection(layer_index, "gate_up_proj", ("gate_proj", "up_proj"))
    return cpu_sparse_module(proj, out_sizes, k, gen)


@pytest.mark.parametrize("with_dense_range", [False, True])
@pytest.mark.parametrize("max_sparse_tokens", [None, 4])
def test_auto_on_a_cpu_sparsifies_what_won_its_race_and_runs_the_rest_as_vllm(
    monkeypatch, max_sparse_tokens, with_dense_range
):
    """Each module's token limit is the largest step it won (capped by max_sparse_tokens); a module
    that won none runs vLLM's dense layer alone, without the GEMV's copy of its weight or counters.
    With a dense-range pass (which vLLM takes on a GPU), the pass gets the largest of those limits
    and the first counting module, and modules that do not count pass no counters in compiled code."""
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod

    from acttail_vllm.serving import linear_method
    from acttail_vllm.serving.dense_range import DenseRangePass
    from acttail_vllm.serving.linear_method import ActTailLinearMethod, SparseModules

    gen = torch.Generator().manual_seed(0)
    k, sizes, budget = 64, [48, 16], ModuleBudget((16, 32), 64)
    built = [cpu_module(i, sizes, k, gen) for i in range(3)]
    layers = [layer for layer, _ in built]
    settings = ActTailSettings(sparsity=0.5, max_sparse_tokens=max_sparse_tokens)
    resolver = SimpleNamespace(
        profile=None, source=SimpleNamespace(settings=settings), resolve=lambda modules: [budget] * len(modules)
    )
    x = torch.randn(3, k, generator=gen).to(torch.bfloat16)

    def race(timed, dtype):
        """What the race times: the op's sparse call, and the dense layer vLLM runs."""
        for (_, weight), module in zip(built, timed):
            expected = reference.sparse_linear_ref(x.float(), weight.float(), None, [0, 48, 64], [16, 32])
            torch.testing.assert_close(module.sparse(x).float(), expected, rtol=2e-2, atol=2e-2)
            torch.testing.assert_close(module.dense(x).float(), x.float() @ weight.float().T, rtol=2e-2, atol=2e-2)
        return [2, 0, 16]

    monkeypatch.setattr(linear_method, "largest_faster_steps", race)
    dense_range = DenseRangePass(SimpleNamespace(compile_ranges_endpoints=[64])) if with_dense_range else None
    modules = SparseModules(resolver, dense_range)
    for layer in layers:
        modules.register(layer)
    assert [modules.loaded(layer) for layer in layers] == [False, False, True]

    cap = 16 if max_sparse_tokens is None else max_sparse_tokens
    states = modules.states
    assert [s.call_site.max_sparse_tokens for s in states] == [2, 0, cap]
    assert [s.ever_sparsified for s in states] == [True, False, True]
    assert [s.counts_stats for s in states] == [True, False, True]
    assert [s.compiled_counters for s in states] == [True, not with_dense_range, True]
    if with_dense_range:
        assert (dense_range.largest_sparsified_step, dense_range.counting_module) == (cap, 0)
        assert dense_range.compilation_config.compile_ranges_endpoints == [cap, 64]
    assert [s.dense_only for s in states] == [False, True, False]
    assert [layer.weight.numel() for layer in layers] == [k * 64, 0, k * 64]

    method = ActTailLinearMethod(modules, states[0].proj)
    vllm_dense = UnquantizedLinearMethod()
    for layer, weight in built:
        twin = torch.nn.Module()
        twin.weight = torch.nn.Parameter(weight.clone(), requires_grad=False)
        vllm_dense.process_weights_after_loading(twin)
        for rows in (1, 2, 3, 5):
            x = torch.randn(rows, k, generator=gen).to(torch.bfloat16)
            served, dense = method.apply(layer, x), vllm_dense.apply(twin, x)
            if rows <= layer.acttail.call_site.max_sparse_tokens:
                sparse = reference.sparse_linear_ref(x.float(), weight.float(), None, [0, 48, 64], [16, 32])
                torch.testing.assert_close(served.float(), sparse, rtol=2e-2, atol=2e-2)
            else:
                assert torch.equal(served, dense)  # a step left dense is dense vLLM's, bit for bit


def test_what_the_modules_trace_into_compiled_graphs_is_part_of_vllms_compile_cache_key(monkeypatch):
    """vLLM keys its compiled graphs, and the artifact a later start reloads, on its own config, which
    leaves out ActTail's settings and the race; a start whose race came out otherwise traces another
    graph and must not share the last one's cache folder (there it failed at its first step). So the
    modules put their choices into ``additional_config``, which vLLM hashes: equal races, equal keys."""
    from vllm.config import VllmConfig, set_current_vllm_config

    from acttail_vllm.serving import linear_method
    from acttail_vllm.serving.linear_method import SparseModules

    k, sizes, budget = 64, [48, 16], ModuleBudget((16, 32), 64)
    resolver = SimpleNamespace(
        profile=None,
        source=SimpleNamespace(settings=ActTailSettings(sparsity=0.5)),
        resolve=lambda modules: [budget] * len(modules),
    )

    def compile_key(race_result: list[int]) -> str:
        monkeypatch.setattr(linear_method, "largest_faster_steps", lambda timed, dtype: race_result)
        config = VllmConfig()
        with set_current_vllm_config(config):
            modules = SparseModules(resolver)
            layers = [cpu_module(i, sizes, k, torch.Generator().manual_seed(i))[0] for i in range(3)]
            for layer in layers:
                modules.register(layer)
            assert [modules.loaded(layer) for layer in layers] == [False, False, True]
        return config.compute_hash()

    first, again, other_limit, other_dense_only = (
        compile_key(race) for race in ([2, 0, 16], [2, 0, 16], [1, 0, 16], [2, 2, 16])
    )
    assert first == again
    assert len({first, other_limit, other_dense_only, VllmConfig().compute_hash()}) == 4


@pytest.mark.parametrize("policy", ["auto", "all"])
def test_compiled_on_a_cpu_a_module_branches_on_the_step_size_as_its_op_would(monkeypatch, policy):
    """vLLM compiles one graph for every step size on a CPU: in it a module's steps over its limit run
    the unsparsified layer and only the others call its op, with the outputs and counts of its eager
    calls on both sides of the limit; under auto the limit is the race's and the module keeps vLLM's
    dense layer, under all it is max_sparse_tokens, here with the GEMV's copy of the weight alone."""
    from acttail_vllm.serving import op as sparse_op
    from acttail_vllm.serving.stats import ModuleStats, TokenPath

    sparse_op.register_sparse_linear_op()
    k, sizes, budget, limit = 64, [48, 16], ModuleBudget((16, 32), 64), 2
    settings = ActTailSettings(sparsity=0.5, policy=policy, max_sparse_tokens=None if policy == "auto" else limit)
    compiled_layer, eager_layer = (cpu_module(0, sizes, k, torch.Generator().manual_seed(1))[0] for _ in range(2))
    for layer in (compiled_layer, eager_layer):
        if policy == "all":  # no room for a second copy
            layer.acttail.dense_layer = None
        layer.acttail.set_budget(budget, settings, limit, counts_stats=True, ever_sparsified=True)
    gen = torch.Generator().manual_seed(0)
    steps = [torch.randn(rows, k, generator=gen).to(torch.bfloat16) for rows in (2, 3, 1, 5, 2)]
    expected = [eager_layer.acttail.sparse_linear(x, eager_layer.weight, None) for x in steps]

    op_calls = []
    run = sparse_op.CallSite.run
    monkeypatch.setattr(
        sparse_op.CallSite, "run", lambda site, x, *args, **kw: op_calls.append(len(x)) or run(site, x, *args, **kw)
    )
    state = compiled_layer.acttail
    compiled = torch.compile(
        lambda x: state.sparse_linear(x, compiled_layer.weight, None), backend="inductor", dynamic=True, fullgraph=True
    )
    for x, eager in zip(steps, expected):
        torch.testing.assert_close(compiled(x), eager, rtol=0, atol=0)
    assert op_calls == [2, 1, 2]  # the steps within the limit
    assert ModuleStats.read(state.stats) == ModuleStats.read(eager_layer.acttail.stats)
    assert ModuleStats.read(state.stats).tokens[TokenPath.UNSPARSIFIED] == 8


@pytest.mark.parametrize("policy", ["auto", "decode"])
def test_modules_without_room_for_a_second_copy_keep_one(monkeypatch, policy):
    """A module past the room for second copies keeps one copy of its weight: under auto vLLM's
    dense layer alone (not raced, run as in dense vLLM, bit for bit), under other policies the
    GEMV's rows alone (dense steps on PyTorch's GEMM); the modules that fit keep both."""
    import vllm.distributed
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod

    from acttail_vllm.serving import linear_method, metrics
    from acttail_vllm.serving.linear_method import ActTailLinearMethod, SecondCopies, SparseLinearState, SparseModules

    gen = torch.Generator().manual_seed(1)
    k, sizes, budget = 64, [48, 16], ModuleBudget((16, 32), 64)
    proj = DecoderProjection(0, "gate_up_proj", ("gate_proj", "up_proj"))
    weights = [(torch.randn(64, k, generator=gen) / k**0.5).to(torch.bfloat16) for _ in range(3)]
    nbytes = weights[0].numel() * weights[0].element_size()
    settings = ActTailSettings(sparsity=0.5, policy=policy)
    resolver = SimpleNamespace(
        profile=None, source=SimpleNamespace(settings=settings), resolve=lambda modules: [budget] * len(modules)
    )
    raced = []

    def race(timed, dtype):
        raced.append(len(timed))
        return [16] * len(timed)

    monkeypatch.setattr(linear_method, "largest_faster_steps", race)
    monkeypatch.setattr(vllm.distributed, "get_tensor_model_parallel_rank", lambda: 0)
    monkeypatch.setattr(metrics, "start_snapshot_writer", lambda modules: None)
    modules = SparseModules(resolver)
    modules.second_copies = SecondCopies(spare=lambda: 2 * nbytes + 2)  # room for one module's copy
    method = ActTailLinearMethod(modules, proj)
    layers = []
    for weight in weights:
        layer = torch.nn.Module()
        layer.weight = torch.nn.Parameter(weight.clone(), requires_grad=False)
        layer.acttail = SparseLinearState(proj, sizes, (1, 1), on_gpu=False)
        modules.register(layer)
        layers.append(layer)
    for layer in layers:
        method.process_weights_after_loading(layer)

    assert (modules.second_copies.allowed, modules.second_copies.refused) == (nbytes + 1, 2)
    states = modules.states
    assert all(s.dense_layer is not None for s in states) == (policy == "auto")
    assert states[0].dense_layer is not None
    if policy == "auto":
        assert raced == [1]
        assert [s.dense_only for s in states] == [False, True, True]
        assert [layer.weight.numel() for layer in layers] == [k * 64, 0, 0]
    else:
        assert raced == []
        assert [s.dense_layer is None for s in states] == [False, True, True]
        assert [layer.weight.numel() for layer in layers] == [k * 64] * 3

    vllm_dense = UnquantizedLinearMethod()
    for index, (layer, weight) in enumerate(zip(layers, weights)):
        twin = torch.nn.Module()
        twin.weight = torch.nn.Parameter(weight.clone(), requires_grad=False)
        vllm_dense.process_weights_after_loading(twin)
        for rows in (1, 3):
            x = torch.randn(rows, k, generator=gen).to(torch.bfloat16)
            served = method.apply(layer, x)
            if policy == "auto" and index > 0:
                assert torch.equal(served, vllm_dense.apply(twin, x))
            else:  # sparsified (decode: no step metadata outside vLLM, so every token)
                sparse = reference.sparse_linear_ref(x.float(), weight.float(), None, [0, 48, 64], [16, 32])
                torch.testing.assert_close(served.float(), sparse, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize(
    ("kv_cache_bytes", "rss", "available", "spare"),
    [
        (None, 10, 100, 82),  # dense vLLM's KV cache: 0.92 of 100 less the 10 held
        (None, 10, 50, 50),  # no more than is available
        (None, 95, 100, 0),  # the weights alone take more than the worker's share
        (30, 10, 50, 20),  # an explicit KV cache: what is available beyond it
    ],
)
def test_spare_cpu_memory_is_what_dense_vllms_kv_cache_would_get(monkeypatch, kv_cache_bytes, rss, available, spare):
    import psutil
    from vllm.config import CacheConfig, VllmConfig, set_current_vllm_config
    from vllm.utils import cpu_resource_utils

    from acttail_vllm.serving.linear_method import spare_cpu_memory

    node = SimpleNamespace(total_memory=100, available_memory=available)
    monkeypatch.setattr(cpu_resource_utils, "get_memory_node_info", lambda node_id=0: node)
    monkeypatch.setattr(psutil, "Process", lambda: SimpleNamespace(memory_info=lambda: SimpleNamespace(rss=rss)))
    config = VllmConfig(cache_config=CacheConfig(gpu_memory_utilization=0.92, kv_cache_memory_bytes=kv_cache_bytes))
    with set_current_vllm_config(config):
        assert spare_cpu_memory() == spare
