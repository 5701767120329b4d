"""Sparsity allocation: invariants of both methods and the input checks."""

from __future__ import annotations

import random

import pytest

from acttail_vllm.profiling.allocation import AllocationSpec, allocate, weighted_mean

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
def test_acttail_invariants(target, eps, s_max, seed):
    alphas, counts = random_case(seed)
    sparsities = allocate(alphas, counts, AllocationSpec(target, "acttail", eps=eps, s_max=s_max))
    assert len(sparsities) == len(alphas)
    assert weighted_mean(sparsities, counts) == pytest.approx(target, abs=MEAN_TOL)
    assert all(0.0 <= s <= s_max for s in sparsities)
    by_alpha = [s for _, s in sorted(zip(alphas, sparsities))]
    assert all(a <= b + 1e-12 for a, b in zip(by_alpha, by_alpha[1:])), "not monotone in alpha"


def test_clipping_is_exercised_and_still_holds_the_target():
    alphas, counts = random_case(0)
    sparsities = allocate(alphas, counts, AllocationSpec(0.9, "acttail", eps=0.5, s_max=0.95))
    assert sum(s == 0.95 for s in sparsities) > 1
    assert weighted_mean(sparsities, counts) == pytest.approx(0.9, abs=MEAN_TOL)


def test_without_clipping_it_is_alphapruning_linear_map_rescaled():
    alphas, counts = [1.0, 2.0, 4.0], [100, 100, 200]
    target, eps = 0.5, 0.2
    sparsities = allocate(alphas, counts, AllocationSpec(target, "acttail", eps=eps, s_max=0.95))
    raw = [target * (1 - eps + 2 * eps * a) for a in (0.0, 1 / 3, 1.0)]
    scale = target / weighted_mean(raw, counts)
    assert sparsities == pytest.approx([r * scale for r in raw], abs=1e-12)
    assert sparsities[2] / sparsities[0] == pytest.approx((1 + eps) / (1 - eps))


def test_equal_alphas_give_uniform_budgets():
    counts = [10, 20, 30, 40]
    assert allocate([3.0] * 4, counts, AllocationSpec(0.7, "acttail", eps=0.3, s_max=0.95)) == pytest.approx(
        [0.7] * 4, abs=1e-12
    )


def test_uniform_method_ignores_alpha():
    alphas, counts = random_case(1)
    assert allocate(alphas, counts, AllocationSpec(0.8, "uniform", eps=0.3, s_max=0.95)) == [0.8] * len(alphas)


def test_target_at_s_max_puts_everything_at_the_cap():
    alphas, counts = random_case(2)
    sparsities = allocate(alphas, counts, AllocationSpec(0.9, "acttail", eps=0.2, s_max=0.9))
    assert sparsities == pytest.approx([0.9] * len(alphas), abs=1e-6)


def test_zero_target_is_dense():
    assert allocate([1.0, 5.0], [1, 1], AllocationSpec(0.0, "acttail", eps=0.2, s_max=0.95)) == [0.0, 0.0]


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
        ({"method": "owl"}, r"unknown allocation method 'owl': choose one of uniform, acttail"),
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
        "method": "acttail",
        "eps": 0.2,
        "s_max": 0.95,
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        spec = AllocationSpec(args["target"], args["method"], eps=args["eps"], s_max=args["s_max"])
        allocate(args["alphas"], args["param_counts"], spec)
