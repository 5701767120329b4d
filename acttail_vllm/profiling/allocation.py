"""Per-projection sparsity budgets from heavy-tail exponents, holding a global target.

The global sparsity S is the mean of per-projection sparsities weighted by parameter count
(in_features * out_features): the fraction of weight bytes a decode step skips.

Methods
-------
``uniform``  every projection gets S.
``acttail``  larger alpha (lighter tail: less trained, so more redundant) gets more sparsity.

What ``acttail`` does, and why. The ActTail paper (arXiv 2603.12272) says budgets come from each
projection's alpha and gives a theory linking sparsity ratio to alpha, but the public material we
could search (abstract, summaries, the first page of the HTML version) does not state its exact
mapping rule. We therefore use AlphaPruning's rule (Lu et al., NeurIPS 2024, ``ww_sparsity``),
which ActTail builds on, applied per projection instead of per block:

1. min-max normalise alpha to a in [0, 1] (all equal -> a = 1/2, i.e. uniform);
2. map linearly into [S(1 - eps), S(1 + eps)]: s_i = S * (1 - eps + 2 * eps * a_i);
3. rescale multiplicatively so the weighted mean is exactly S (AlphaPruning's ``scaler``);
4. our addition: if any s_i falls outside [0, s_max], clip and solve for one additive shift c
   (bisection) so that mean_w(clip(s_i + c, 0, s_max)) = S. Clip and shift are monotone, so the
   budgets stay non-decreasing in alpha; with no clipping needed step 4 changes nothing.

``AllocationSpec`` carries the five settings of an allocation (target, method, estimator, eps,
s_max) through the profiler, the loader hook, the profile cache and ``acttail eval``. Its defaults
are set here, once:

- method ``acttail``;
- estimator ``hill``: on SmolLM2 the KS-selected xmin of ``ww`` often lands on a tiny tail and gives
  outliers (alpha 10-22 next to typical 2-6), which min-max normalisation turns into near-uniform
  budgets for everything else; ``hill`` stays within 1.4-4.2. AlphaPruning also found its
  ``alpha_mid`` (Hill) metric best;
- eps 0.1: tuned on SmolLM2-135M (hill and ww x eps 0.1/0.2/0.3 at 70% and 80% on the held-out
  ``tuning`` text; lowest mean log-perplexity: hill, 0.1);
- s_max 0.95.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

Method = Literal["uniform", "acttail"]
METHODS: tuple[str, ...] = ("uniform", "acttail")

DEFAULT_METHOD: Method = "acttail"
DEFAULT_ESTIMATOR = "hill"
DEFAULT_EPS = 0.1
DEFAULT_S_MAX = 0.95

#: Bisection stops once the weighted mean is this close to the target.
MEAN_TOLERANCE = 1e-12
_MAX_BISECTIONS = 200


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
            f"eps {eps} is outside [0, 1): it is the relative spread of budgets around the target "
            "(0 = uniform; AlphaPruning uses 0.1-0.3)"
        )


@dataclass(frozen=True)
class AllocationSpec:
    """How budgets are allocated: the global ``target``, the rule (``method``, its ``eps``), the
    alpha ``estimator`` (see ``esd.ESTIMATORS``) and the cap ``s_max`` on any projection.
    Checked when made: a bad value raises ValueError naming it."""

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


def _clip_to_target(raw: list[float], param_counts: Sequence[int], target: float, s_max: float) -> list[float]:
    """Clip to [0, s_max] with one additive shift chosen so the weighted mean stays ``target``."""

    def shifted(shift: float) -> list[float]:
        return [min(s_max, max(0.0, s + shift)) for s in raw]

    low, high = -max(raw), s_max - min(raw)  # all zero / all at s_max
    for _ in range(_MAX_BISECTIONS):
        mid = 0.5 * (low + high)
        mean = weighted_mean(shifted(mid), param_counts)
        if abs(mean - target) <= MEAN_TOLERANCE:
            break
        if mean < target:
            low = mid
        else:
            high = mid
    return shifted(mid)


def allocate(alphas: Sequence[float], param_counts: Sequence[int], spec: AllocationSpec) -> list[float]:
    """Sparsity per projection (same order as ``alphas``) with parameter-weighted mean ``spec.target``."""
    _check_projections(alphas, param_counts)
    target, method, eps, s_max = spec.target, spec.method, spec.eps, spec.s_max
    if method == "uniform" or target == 0.0:
        return [target] * len(alphas)
    low, high = min(alphas), max(alphas)
    span = high - low
    normalised = [(a - low) / span if span > 0 else 0.5 for a in alphas]
    raw = [target * (1.0 - eps + 2.0 * eps * a) for a in normalised]
    scale = target / weighted_mean(raw, param_counts)
    scaled = [s * scale for s in raw]
    if all(0.0 <= s <= s_max for s in scaled):
        return scaled
    return _clip_to_target(scaled, param_counts, target, s_max)
