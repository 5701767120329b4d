"""Policy auto on a CPU: the startup race between each module's sparse GEMV and vLLM's dense layer,
and what the modules do with its result (no server). vLLM is imported inside the tests: importing it
on a CPU turns Triton off for the process, and the Triton interpreter tests share the worker."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from acttail_kernels import cpu, reference
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
    """A vLLM-like CPU layer with its ActTail state, as the linear method leaves it after loading."""
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod

    from acttail_vllm.serving.linear_method import SparseLinearState

    proj = DecoderProjection(layer_index, "gate_up_proj", ("gate_proj", "up_proj"))
    weight = (torch.randn(sum(out_sizes), k, generator=gen) / k**0.5).to(torch.bfloat16)
    layer = torch.nn.Module()
    layer.acttail = SparseLinearState(proj, out_sizes, (1, 1), on_gpu=False)
    layer.weight = torch.nn.Parameter(cpu.prepare_weight(weight, layer.acttail.seg_bounds), requires_grad=False)
    layer.acttail.add_dense_layer(UnquantizedLinearMethod(), weight.clone(), None)
    return layer, weight


@pytest.mark.parametrize("max_sparse_tokens", [None, 4])
def test_auto_on_a_cpu_sparsifies_what_won_its_race_and_runs_the_rest_as_vllm(monkeypatch, max_sparse_tokens):
    """Each module's token limit is the largest step it won (capped by max_sparse_tokens); a module
    that won none runs vLLM's dense layer alone, without the GEMV's copy of its weight or counters."""
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod

    from acttail_vllm.serving import linear_method
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
    modules = SparseModules(resolver)
    for layer in layers:
        modules.register(layer)
    assert [modules.loaded(layer) for layer in layers] == [False, False, True]

    cap = 16 if max_sparse_tokens is None else max_sparse_tokens
    states = modules.states
    assert [s.call_site.max_sparse_tokens for s in states] == [2, 0, cap]
    assert [s.ever_sparsified for s in states] == [True, False, True]
    assert [s.counts_stats for s in states] == [True, False, True]
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
