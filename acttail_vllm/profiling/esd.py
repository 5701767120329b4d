"""Heavy-tail exponent alpha of a weight matrix's empirical spectral density (ESD).

Pure torch: runs on whatever device the weight lives on. The ESD is the set of eigenvalues of
W^T W, taken on the smaller Gram side (W^T W and W W^T share their nonzero eigenvalues).

Two power-law tail fits, both the continuous MLE ``alpha = 1 + n / sum(log(x_i / xmin))`` over the
n eigenvalues x_i >= xmin; they differ in how xmin is chosen:

``hill``  AlphaPruning's PL_Alpha_Hill with ``fix_fingers="xmin_mid"``: xmin is the eigenvalue at
          index N // 2 of the ascending spectrum (all N eigenvalues, none filtered, as AlphaPruning's
          default ``filter_zeros=False``). One fit, no search; stable on small matrices.
``ww``    weightwatcher 0.7.7's ``alpha`` column with its defaults (``fix_fingers=False``,
          ``xmax=None``, ``pl_package="ww"``, no normalisation): eigenvalues <= 1e-5 are dropped,
          every remaining eigenvalue but the largest is tried as xmin, and the fit with the smallest
          Kolmogorov-Smirnov distance wins (first one on ties; fits with alpha <= 1 get distance 1).
          Vectorised over all candidate xmins, chunked so the candidate-by-eigenvalue matrix stays
          within ``KS_CHUNK_ELEMENTS`` numbers.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

#: weightwatcher's EVALS_THRESH: eigenvalues at or below it are numerical zeros, left out of the fit.
WW_EVALS_THRESH = 1e-5
#: Below this many eigenvalues weightwatcher switches to a different small-sample estimator.
WW_MIN_EVALS = 20
#: Upper bound on the elements of one KS-distance block (float64: 16M elements = 128 MiB).
KS_CHUNK_ELEMENTS = 1 << 24


def gram_eigenvalues(weight: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Eigenvalues of W^T W in ascending order, computed in ``dtype`` on ``weight``'s device."""
    if weight.ndim != 2:
        raise ValueError(f"expected a 2-D weight matrix, got shape {tuple(weight.shape)}")
    if weight.numel() == 0:
        raise ValueError(f"weight matrix of shape {tuple(weight.shape)} is empty")
    w = weight.to(dtype)
    gram = w.T @ w if w.shape[0] >= w.shape[1] else w @ w.T
    # A Gram matrix is PSD; eigvalsh can return tiny negatives from round-off.
    return torch.linalg.eigvalsh(gram).clamp_min_(0.0)


def _sorted_float64(evals: torch.Tensor) -> torch.Tensor:
    if evals.ndim != 1 or evals.numel() == 0:
        raise ValueError(f"expected a non-empty 1-D tensor of eigenvalues, got shape {tuple(evals.shape)}")
    x = torch.sort(evals.to(torch.float64)).values
    if not torch.isfinite(x).all():
        raise ValueError("eigenvalues contain NaN or infinity: the weight matrix is not finite")
    return x


def alpha_hill(evals: torch.Tensor) -> float:
    """PL_Alpha_Hill with xmin at the middle eigenvalue (AlphaPruning's ``xmin_mid``)."""
    x = _sorted_float64(evals)
    i = x.numel() // 2
    xmin = x[i]
    if xmin <= 0:
        raise ValueError(
            f"the middle eigenvalue is {xmin.item():g}: more than half the spectrum is zero, "
            "so the matrix has no tail to fit"
        )
    n = x.numel() - i
    spread = torch.log(x[i:]).sum() - n * torch.log(xmin)
    if spread <= 0:
        raise ValueError("the upper half of the spectrum is flat: the power-law exponent is undefined")
    return float(1.0 + n / spread)


def alpha_ww(evals: torch.Tensor) -> float:
    """weightwatcher's power-law alpha: MLE at the KS-optimal xmin (see module docstring)."""
    x = _sorted_float64(evals)
    x = x[x > WW_EVALS_THRESH]
    num = x.numel()
    if num < WW_MIN_EVALS:
        raise ValueError(
            f"only {num} eigenvalues above {WW_EVALS_THRESH:g}; the 'ww' estimator needs at least "
            f"{WW_MIN_EVALS} (use the 'hill' estimator for such small matrices)"
        )
    log_x = torch.log(x)
    # tail_log_sum[i] = sum(log x[i:]), the MLE numerator for xmin = x[i].
    tail_log_sum = torch.flip(torch.cumsum(torch.flip(log_x, (0,)), 0), (0,))
    candidates = torch.arange(num - 1, device=x.device)
    tail_size = (num - candidates).to(torch.float64)
    alphas = 1.0 + tail_size / (tail_log_sum[:-1] - tail_size * log_x[:-1])

    distances = torch.ones(num - 1, dtype=torch.float64, device=x.device)
    rows_per_chunk = max(1, KS_CHUNK_ELEMENTS // num)
    for start in range(0, num - 1, rows_per_chunk):
        rows = slice(start, min(num - 1, start + rows_per_chunk))
        # Columns before the first candidate of the chunk lie below every xmin in it.
        rank_in_tail = (torch.arange(start, num, device=x.device)[None, :] - candidates[rows, None]).to(torch.float64)
        model_cdf = 1.0 - torch.exp((1.0 - alphas[rows, None]) * (log_x[None, start:] - log_x[rows, None]))
        empirical_cdf = rank_in_tail / tail_size[rows, None]
        gap = (model_cdf - empirical_cdf).abs().masked_fill_(rank_in_tail < 0, 0.0)
        distances[rows] = gap.amax(dim=1)
    distances = torch.where(alphas > 1.0, distances, torch.ones_like(distances))
    return float(alphas[torch.argmin(distances)])


ESTIMATORS: dict[str, Callable[[torch.Tensor], float]] = {"hill": alpha_hill, "ww": alpha_ww}


def get_estimator(name: str) -> Callable[[torch.Tensor], float]:
    """The estimator called ``name``; ValueError listing the choices if there is none."""
    try:
        return ESTIMATORS[name]
    except KeyError:
        raise ValueError(f"unknown estimator {name!r}: choose one of {', '.join(sorted(ESTIMATORS))}") from None


def heavy_tail_alpha(weight: torch.Tensor, estimator: str, dtype: torch.dtype = torch.float64) -> float:
    """Power-law exponent of ``weight``'s ESD by the named estimator (see ``ESTIMATORS``)."""
    return get_estimator(estimator)(gram_eigenvalues(weight, dtype))
