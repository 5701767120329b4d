"""Per-projection sparsity budgets from heavy-tail exponents, holding a global target.

The global sparsity S is the mean of per-projection sparsities weighted by parameter count
(in_features * out_features): the fraction of weight bytes a decode step skips. Every method
returns budgets in [0, s_max] whose weighted mean is S.

Methods (the derivation and the measurements behind them: ``docs/allocation.md``)
-------
``uniform``       every projection gets S.
``acttail``       the default. TopK on projection i's input costs loss g_i per parameter and
                  per unit of dropped input energy D(s_i) (Laplace entries). Minimising
                  sum_i n_i g_i D(s_i) at the weighted target gives the KKT solution
                  s_i = min(s_max, 1 - exp(-sqrt(2 mu / g_i))), mu found by bisection, with
                  g_i = TYPE_COSTS[type_i] * alpha_i^p / (mean of alpha^p over that type), p =
                  ALPHA_POWER. The projection type sets the level: the loss is ~10x more sensitive
                  to TopK on v_proj than on down_proj, which no weight-only statistic predicts.
                  Alpha moves budget within a type: a heavier tail (lower alpha) gets more sparsity.
``alphapruning``  AlphaPruning's weight-pruning rule (Lu et al., NeurIPS 2024, ``ww_sparsity``)
                  applied per projection: larger alpha (lighter tail) gets more sparsity. Kept as a
                  baseline; on activation TopK it loses to uniform.

``alphapruning`` step by step:

1. min-max normalise alpha to a in [0, 1] (all equal -> a = 1/2, i.e. uniform);
2. map linearly into [S(1 - eps), S(1 + eps)]: s_i = S * (1 - eps + 2 * eps * a_i);
3. rescale multiplicatively so the weighted mean is exactly S (AlphaPruning's ``scaler``);
4. if any s_i falls outside [0, s_max], clip and solve for one additive shift c (bisection) so that
   mean_w(clip(s_i + c, 0, s_max)) = S. Clip and shift are monotone, so the budgets stay
   non-decreasing in alpha; with no clipping needed step 4 changes nothing.

``AllocationSpec`` carries the five settings of an allocation (target, method, estimator, eps,
s_max) through the profiler, the loader hook, the profile cache and ``acttail eval``. Its defaults
are set here, once:

- method ``acttail``;
- estimator ``hill``: on SmolLM2 the KS-selected xmin of ``ww`` often lands on a tiny tail and gives
  outliers (alpha 10-22 next to typical 2-6); ``hill`` stays within 1.4-4.2. AlphaPruning also
  found its ``alpha_mid`` (Hill) metric best;
- eps 0.1 (``alphapruning`` only): the best of 0.1 / 0.2 / 0.3 on SmolLM2-135M's tuning text;
- s_max 0.9 and ALPHA_POWER 1.5: the best of s_max 0.9 / 0.95 x alpha_power 0 / 1.5 / 3 by mean log
  perplexity ratio to uniform at 50/70/80% on the tuning text of the real models
  (``benchmarks/quality_sweep.py --phase tune``, docs/allocation.md).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

Method = Literal["uniform", "alphapruning", "acttail"]
METHODS: tuple[str, ...] = ("uniform", "alphapruning", "acttail")

DEFAULT_METHOD: Method = "acttail"
DEFAULT_ESTIMATOR = "hill"
DEFAULT_EPS = 0.1
DEFAULT_S_MAX = 0.9

#: Loss cost of each projection type: dNLL per million parameters when that type alone is
#: sparsified at 80% in every layer, mean of SmolLM2-135M-Instruct and Gemma 3 270M on the tuning
#: slice; ``tools/measure_type_costs.py`` measures them.
TYPE_COSTS: dict[str, float] = {
    "q_proj": 0.035,
    "k_proj": 0.062,
    "v_proj": 0.125,
    "o_proj": 0.020,
    "gate_proj": 0.066,
    "up_proj": 0.072,
    "down_proj": 0.013,
}
#: How strongly alpha moves ``acttail`` budgets within a projection type (0: type and shape only).
ALPHA_POWER = 1.5

#: Bisection stops once the weighted mean is this close to the target.
MEAN_TOLERANCE = 1e-12
_MAX_BISECTIONS = 400


def weighted_mean(values: Sequence[float], weights: Sequence[int]) -> float:
    """Mean of ``values`` weighted by ``weights`` (parameter counts)."""
    return math.fsum(v * w for v, w in zip(values, weights)) / math.fsum(weights)


def check_allocation_args(target: float, method: str, eps: float, s_max: float) -> None:
    """Raise ValueError naming the first bad argument (callers use it to fail before heavy work)."""
    if method not in METHODS:
        raise ValueError(f"unknown allocation method {method!r}: choose one of {', '.join(METHODS)}")
    if not 0.0 <= target < 1.0:
        raise ValueError(f"target sparsity {target} is outside [0, 1): give a fraction such as 0.8")
    if not 0.0 < s_max < 1.0:
        raise ValueError(f"s_max {s_max} is outside (0, 1): it caps each projection's sparsity")
    if s_max < target:
        raise ValueError(
            f"s_max {s_max} is below the target sparsity {target}: no allocation capped at s_max "
            "can reach the target; raise s_max or lower the target"
        )
    if not 0.0 <= eps < 1.0:
        raise ValueError(
            f"eps {eps} is outside [0, 1): it is alphapruning's relative spread of budgets around the "
            "target (0 = uniform; AlphaPruning uses 0.1-0.3)"
        )


@dataclass(frozen=True)
class AllocationSpec:
    """How budgets are allocated: the global ``target``, the rule (``method``), the alpha
    ``estimator`` (see ``esd.ESTIMATORS``), ``eps`` (the relative spread of ``alphapruning``; the
    other methods ignore it) and the cap ``s_max`` on any projection (``alphapruning`` and
    ``acttail``). Checked when made: a bad value raises ValueError naming it."""

    target: float
    method: Method = DEFAULT_METHOD
    estimator: str = DEFAULT_ESTIMATOR
    eps: float = DEFAULT_EPS
    s_max: float = DEFAULT_S_MAX

    def __post_init__(self) -> None:
        check_allocation_args(self.target, self.method, self.eps, self.s_max)

    def with_target(self, target: float) -> AllocationSpec:
        return AllocationSpec(target, self.method, self.estimator, self.eps, self.s_max)

    @property
    def file_stem(self) -> str:
        """A file name that tells these settings apart: ``acttail-hill-eps0.1-smax0.95-s0.5``."""
        return f"{self.method}-{self.estimator}-eps{self.eps:g}-smax{self.s_max:g}-s{self.target:g}"

    def describe(self) -> str:
        return (
            f"{self.method} at target {self.target:g} "
            f"(estimator {self.estimator}, eps {self.eps:g}, s_max {self.s_max:g})"
        )


def _check_projections(alphas: Sequence[float], param_counts: Sequence[int]) -> None:
    if len(alphas) != len(param_counts):
        raise ValueError(
            f"got {len(alphas)} alphas but {len(param_counts)} parameter counts: give one of each per projection"
        )
    if not alphas:
        raise ValueError("no projections to allocate sparsity to")
    for i, alpha in enumerate(alphas):
        if not math.isfinite(alpha):
            raise ValueError(f"alpha of projection {i} is {alpha}: every alpha must be finite")
    for i, count in enumerate(param_counts):
        if count <= 0:
            raise ValueError(f"parameter count of projection {i} is {count}: it must be positive")


def _bisect(mean_of: Callable[[float], float], low: float, high: float, target: float) -> float:
    """The x in [low, high] where the increasing ``mean_of(x)`` is ``target`` (to MEAN_TOLERANCE)."""
    for _ in range(_MAX_BISECTIONS):
        mid = 0.5 * (low + high)
        mean = mean_of(mid)
        if abs(mean - target) <= MEAN_TOLERANCE:
            break
        if mean < target:
            low = mid
        else:
            high = mid
    return mid


def _clip_to_target(raw: list[float], param_counts: Sequence[int], target: float, s_max: float) -> list[float]:
    """Clip to [0, s_max] with one additive shift chosen so the weighted mean stays ``target``."""

    def shifted(shift: float) -> list[float]:
        return [min(s_max, max(0.0, s + shift)) for s in raw]

    # all zero / all at s_max
    shift = _bisect(lambda c: weighted_mean(shifted(c), param_counts), -max(raw), s_max - min(raw), target)
    return shifted(shift)


def _alphapruning(alphas: Sequence[float], param_counts: Sequence[int], spec: AllocationSpec) -> list[float]:
    target, eps, s_max = spec.target, spec.eps, spec.s_max
    low, high = min(alphas), max(alphas)
    span = high - low
    normalised = [(a - low) / span if span > 0 else 0.5 for a in alphas]
    raw = [target * (1.0 - eps + 2.0 * eps * a) for a in normalised]
    scale = target / weighted_mean(raw, param_counts)
    scaled = [s * scale for s in raw]
    if all(0.0 <= s <= s_max for s in scaled):
        return scaled
    return _clip_to_target(scaled, param_counts, target, s_max)


def type_alpha_costs(
    alphas: Sequence[float], projections: Sequence[str], alpha_power: float = ALPHA_POWER
) -> list[float]:
    """``acttail``'s cost per parameter of each projection: its type's cost times alpha **
    ``alpha_power`` over the mean of alpha ** ``alpha_power`` in that type in this model (the factor
    averages 1 over a type, so each type's mean cost stays its ``TYPE_COSTS`` entry)."""
    if len(projections) != len(alphas):
        raise ValueError(f"got {len(projections)} projection names for {len(alphas)} alphas: give one per alpha")
    unknown = sorted(set(projections) - set(TYPE_COSTS))
    if unknown:
        raise ValueError(
            f"no type cost for projection(s) {', '.join(map(repr, unknown))}: acttail knows {', '.join(TYPE_COSTS)}"
        )
    if not math.isfinite(alpha_power):
        raise ValueError(f"alpha_power {alpha_power} must be a finite number")
    for i, alpha in enumerate(alphas):
        if alpha <= 0.0:
            raise ValueError(f"alpha of projection {i} is {alpha}: acttail needs positive alphas")
    powered = [a**alpha_power for a in alphas]
    by_type: dict[str, list[float]] = {}
    for value, proj in zip(powered, projections):
        by_type.setdefault(proj, []).append(value)
    type_mean = {proj: math.fsum(values) / len(values) for proj, values in by_type.items()}
    return [TYPE_COSTS[p] * v / type_mean[p] for v, p in zip(powered, projections)]


def _acttail(
    alphas: Sequence[float],
    param_counts: Sequence[int],
    spec: AllocationSpec,
    projections: Sequence[str],
    alpha_power: float,
) -> list[float]:
    costs = type_alpha_costs(alphas, projections, alpha_power)

    def budgets(log_mu: float) -> list[float]:
        mu = math.exp(log_mu)
        return [min(spec.s_max, -math.expm1(-math.sqrt(2.0 * mu / g))) for g in costs]

    # exp(+-200) spans every cost ratio a model can have: all budgets ~0 to all at s_max
    log_mu = _bisect(lambda x: weighted_mean(budgets(x), param_counts), -200.0, 200.0, spec.target)
    return budgets(log_mu)


def allocate(
    alphas: Sequence[float],
    param_counts: Sequence[int],
    spec: AllocationSpec,
    projections: Sequence[str] | None = None,
    *,
    alpha_power: float = ALPHA_POWER,
) -> list[float]:
    """Sparsity per projection (same order as ``alphas``) with parameter-weighted mean ``spec.target``.

    ``projections`` names each entry's projection (``q_proj`` ... ``down_proj``); ``acttail`` needs
    them, the other methods ignore them. ``alpha_power`` is ``acttail``'s within-type exponent."""
    _check_projections(alphas, param_counts)
    if spec.method == "acttail" and projections is None:
        raise ValueError(
            "method 'acttail' needs the projection name (q_proj ... down_proj) of each alpha: pass projections"
        )
    if spec.method == "uniform" or spec.target == 0.0:
        return [spec.target] * len(alphas)
    if spec.method == "alphapruning":
        return _alphapruning(alphas, param_counts, spec)
    return _acttail(alphas, param_counts, spec, projections, alpha_power)
