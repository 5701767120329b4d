"""Sparsity allocation: invariants of every method and the input checks."""

from __future__ import annotations

import math
import random

import pytest

from acttail_vllm.profiling.allocation import TYPE_COSTS, AllocationSpec, allocate, type_alpha_costs, weighted_mean
from acttail_vllm.profiling.profile import PROJECTION_NAMES

#: The weighted mean must hold the target this tightly (the requirement is 1e-3).
MEAN_TOL = 1e-6


def random_case(seed: int, n: int = 70) -> tuple[list[float], list[int]]:
    rng = random.Random(seed)
    alphas = [rng.uniform(1.5, 8.0) for _ in range(n)]
    counts = [rng.choice([576 * 576, 192 * 576, 1536 * 576, 5120 * 13824]) for _ in range(n)]
    return alphas, counts


CASES = [
    # (target, eps, s_max): no clipping, clipping at s_max, clipping at 0 is impossible (eps < 1)
    (0.5, 0.2, 0.95),
    (0.8, 0.2, 0.95),
    (0.9, 0.5, 0.95),
    (0.7, 0.9, 0.8),
    (0.3, 0.0, 0.95),
]


@pytest.mark.parametrize(("target", "eps", "s_max"), CASES)
@pytest.mark.parametrize("seed", range(3))
def test_alphapruning_invariants(target, eps, s_max, seed):
    alphas, counts = random_case(seed)
    sparsities = allocate(alphas, counts, AllocationSpec(target, "alphapruning", eps=eps, s_max=s_max))
    assert len(sparsities) == len(alphas)
    assert weighted_mean(sparsities, counts) == pytest.approx(target, abs=MEAN_TOL)
    assert all(0.0 <= s <= s_max for s in sparsities)
    by_alpha = [s for _, s in sorted(zip(alphas, sparsities))]
    assert all(a <= b + 1e-12 for a, b in zip(by_alpha, by_alpha[1:])), "not monotone in alpha"


def test_clipping_is_exercised_and_still_holds_the_target():
    alphas, counts = random_case(0)
    sparsities = allocate(alphas, counts, AllocationSpec(0.9, "alphapruning", eps=0.5, s_max=0.95))
    assert sum(s == 0.95 for s in sparsities) > 1
    assert weighted_mean(sparsities, counts) == pytest.approx(0.9, abs=MEAN_TOL)


def test_without_clipping_it_is_alphapruning_linear_map_rescaled():
    alphas, counts = [1.0, 2.0, 4.0], [100, 100, 200]
    target, eps = 0.5, 0.2
    sparsities = allocate(alphas, counts, AllocationSpec(target, "alphapruning", eps=eps, s_max=0.95))
    raw = [target * (1 - eps + 2 * eps * a) for a in (0.0, 1 / 3, 1.0)]
    scale = target / weighted_mean(raw, counts)
    assert sparsities == pytest.approx([r * scale for r in raw], abs=1e-12)
    assert sparsities[2] / sparsities[0] == pytest.approx((1 + eps) / (1 - eps))


def test_equal_alphas_give_uniform_budgets():
    counts = [10, 20, 30, 40]
    assert allocate([3.0] * 4, counts, AllocationSpec(0.7, "alphapruning", eps=0.3, s_max=0.95)) == pytest.approx(
        [0.7] * 4, abs=1e-12
    )


def test_uniform_method_ignores_alpha():
    alphas, counts = random_case(1)
    assert allocate(alphas, counts, AllocationSpec(0.8, "uniform", eps=0.3, s_max=0.95)) == [0.8] * len(alphas)


def test_target_at_s_max_puts_everything_at_the_cap():
    alphas, counts = random_case(2)
    sparsities = allocate(alphas, counts, AllocationSpec(0.9, "alphapruning", eps=0.2, s_max=0.9))
    assert sparsities == pytest.approx([0.9] * len(alphas), abs=1e-6)


def test_zero_target_is_dense():
    assert allocate([1.0, 5.0], [1, 1], AllocationSpec(0.0, "alphapruning", eps=0.2, s_max=0.95)) == [0.0, 0.0]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"target": 1.0}, r"target sparsity 1.0 is outside \[0, 1\)"),
        ({"target": -0.1}, r"target sparsity -0.1 is outside \[0, 1\)"),
        ({"target": float("nan")}, r"target sparsity nan is outside \[0, 1\)"),
        ({"s_max": 0.5}, r"s_max 0.5 is below the target sparsity 0.8"),
        ({"s_max": 1.0}, r"s_max 1.0 is outside \(0, 1\)"),
        ({"eps": -0.1}, r"eps -0.1 is outside \[0, 1\)"),
        ({"eps": 1.0}, r"eps 1.0 is outside \[0, 1\)"),
        ({"method": "owl"}, r"unknown allocation method 'owl': choose one of uniform, alphapruning, acttail"),
        ({"param_counts": [1, 2]}, r"got 3 alphas but 2 parameter counts"),
        ({"alphas": [1.0, float("inf"), 2.0]}, r"alpha of projection 1 is inf: every alpha must be finite"),
        ({"alphas": [1.0, float("nan"), 2.0]}, r"alpha of projection 1 is nan"),
        ({"param_counts": [1, 0, 2]}, r"parameter count of projection 1 is 0"),
        ({"alphas": [], "param_counts": []}, r"no projections to allocate sparsity to"),
    ],
)
def test_bad_inputs_raise_specific_errors(kwargs, message):
    args = {
        "alphas": [1.0, 2.0, 3.0],
        "param_counts": [1, 1, 1],
        "target": 0.8,
        "method": "alphapruning",
        "eps": 0.2,
        "s_max": 0.95,
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        spec = AllocationSpec(args["target"], args["method"], eps=args["eps"], s_max=args["s_max"])
        allocate(args["alphas"], args["param_counts"], spec)


# acttail: the type-cost KKT allocation

#: (out, in) of each projection of a SmolLM2-135M layer.
SHAPES = {
    "q_proj": (576, 576),
    "k_proj": (192, 576),
    "v_proj": (192, 576),
    "o_proj": (576, 576),
    "gate_proj": (1536, 576),
    "up_proj": (1536, 576),
    "down_proj": (576, 1536),
}


def model_case(seed: int, layers: int = 12) -> tuple[list[float], list[int], list[str]]:
    """Alphas, parameter counts and projection names of a SmolLM2-shaped model."""
    rng = random.Random(seed)
    names = [name for _ in range(layers) for name in PROJECTION_NAMES]
    counts = [SHAPES[name][0] * SHAPES[name][1] for name in names]
    return [rng.uniform(1.4, 4.5) for _ in names], counts, names


def acttail(alphas, counts, names, target, s_max=0.95, **kwargs):
    return allocate(alphas, counts, AllocationSpec(target, "acttail", s_max=s_max), names, **kwargs)


def test_every_projection_type_has_a_cost():
    assert set(TYPE_COSTS) == set(PROJECTION_NAMES)
    assert all(cost > 0 for cost in TYPE_COSTS.values())


@pytest.mark.parametrize(("target", "s_max"), [(0.3, 0.95), (0.5, 0.95), (0.7, 0.95), (0.8, 0.9), (0.9, 0.95)])
@pytest.mark.parametrize("seed", range(3))
def test_acttail_holds_the_target_and_the_cap(target, s_max, seed):
    alphas, counts, names = model_case(seed)
    sparsities = acttail(alphas, counts, names, target, s_max)
    assert weighted_mean(sparsities, counts) == pytest.approx(target, abs=1e-10)
    assert all(0.0 <= s <= s_max for s in sparsities)
    if target >= 0.8:
        assert any(s == s_max for s in sparsities), "the cap is not exercised"


def test_acttail_is_the_kkt_point_of_the_type_costs():
    """Unclipped budgets satisfy g_i * ln(1 - s_i)^2 = 2 mu, one mu for all (Laplace KKT)."""
    alphas, counts, names = model_case(4)
    sparsities = acttail(alphas, counts, names, 0.8)
    costs = type_alpha_costs(alphas, names)
    two_mu = [g * math.log1p(-s) ** 2 for g, s in zip(costs, sparsities) if s < 0.95]
    assert len(two_mu) > len(names) // 2
    assert max(two_mu) == pytest.approx(min(two_mu), rel=1e-9)
    assert all(2 * max(two_mu) / g >= math.log1p(-0.95) ** 2 for g, s in zip(costs, sparsities) if s == 0.95)


def test_target_at_s_max_puts_every_acttail_budget_at_the_cap():
    alphas, counts, names = model_case(5)
    assert acttail(alphas, counts, names, 0.9, s_max=0.9) == pytest.approx([0.9] * len(names), abs=1e-9)


def test_cheaper_type_gets_more_sparsity():
    alphas, counts, names = model_case(6)
    equal = [3.0] * len(names)  # within-type factor 1 for every projection
    sparsities = dict(zip(names, acttail(equal, counts, names, 0.6)))
    by_cost = sorted(TYPE_COSTS, key=TYPE_COSTS.__getitem__)
    assert [sparsities[name] for name in by_cost] == sorted(sparsities.values(), reverse=True)
    assert sparsities["down_proj"] > sparsities["v_proj"] + 0.2


def test_alpha_power_zero_depends_on_type_and_shape_only():
    first, counts, names = model_case(7)
    second, _, _ = model_case(8)
    budgets = acttail(first, counts, names, 0.7, alpha_power=0.0)
    assert budgets == acttail(second, counts, names, 0.7, alpha_power=0.0)
    assert budgets == acttail([3.0] * len(names), counts, names, 0.7, alpha_power=0.0)
    per_type = {(name, s) for name, s in zip(names, budgets)}
    assert len(per_type) == len(PROJECTION_NAMES)


@pytest.mark.parametrize("alpha_power", [1.0, 3.0])
def test_lower_alpha_within_a_type_gets_more_sparsity(alpha_power):
    alphas, counts, names = model_case(9)
    sparsities = acttail(alphas, counts, names, 0.5, alpha_power=alpha_power)
    for name in PROJECTION_NAMES:
        rows = sorted((a, s) for a, s, n in zip(alphas, sparsities, names) if n == name)
        by_alpha = [s for _, s in rows]
        assert all(x > y for x, y in zip(by_alpha, by_alpha[1:])), f"{name} budgets do not fall with alpha"


def test_within_type_factor_averages_one():
    alphas, _, names = model_case(10)
    costs = type_alpha_costs(alphas, names, 3.0)
    for name in PROJECTION_NAMES:
        mine = [g for g, n in zip(costs, names) if n == name]
        assert sum(mine) / len(mine) == pytest.approx(TYPE_COSTS[name], rel=1e-12)


def test_projection_names_are_ignored_by_the_other_methods():
    alphas, counts, names = model_case(11)
    for method in ("uniform", "alphapruning"):
        spec = AllocationSpec(0.7, method)
        assert allocate(alphas, counts, spec) == allocate(alphas, counts, spec, names)


@pytest.mark.parametrize(
    ("names", "kwargs", "message"),
    [
        (None, {}, r"method 'acttail' needs the projection name .* pass projections"),
        (["q_proj", "k_proj"], {}, r"got 2 projection names for 3 alphas"),
        (["q_proj", "k_proj", "w_proj"], {}, r"no type cost for projection\(s\) 'w_proj': acttail knows q_proj"),
        (["q_proj", "k_proj", "v_proj"], {"alpha_power": float("nan")}, r"alpha_power nan must be a finite number"),
    ],
)
def test_bad_acttail_inputs_raise_specific_errors(names, kwargs, message):
    with pytest.raises(ValueError, match=message):
        allocate([1.0, 2.0, 3.0], [1, 1, 1], AllocationSpec(0.5, "acttail"), names, **kwargs)


def test_acttail_needs_positive_alphas():
    with pytest.raises(ValueError, match=r"alpha of projection 1 is -2.0: acttail needs positive alphas"):
        allocate([1.0, -2.0], [1, 1], AllocationSpec(0.5, "acttail"), ["q_proj", "q_proj"])
