"""Plain-PyTorch semantics of the TopK-sparse linear layer: the definition the Triton kernels match.

Each token keeps the ``keep`` largest-|x| entries of its input and zeroes the rest; ties at the
threshold go to the lower input index (a stable descending sort). A merged projection (QKV, gate_up)
splits its output columns into segments, each with its own ``keep``.

Threshold mode (TEAL's rule) keeps, instead, every entry with |x| >= the segment's threshold, so the
count kept varies by token and nothing needs sorting.
"""

from __future__ import annotations

import torch


def check_segments(n: int, k: int, seg_bounds: list[int], seg_keep: list[int]) -> None:
    """Raise ValueError unless ``seg_bounds``/``seg_keep`` describe output segments of an [.., n] output
    over k input channels: bounds 0 = b0 < b1 < ... = n and one keep in [0, k] per segment."""
    check_bounds(n, seg_bounds)
    if len(seg_keep) != len(seg_bounds) - 1:
        raise ValueError(
            f"seg_keep needs one entry per segment ({len(seg_bounds) - 1} for seg_bounds "
            f"{list(seg_bounds)}), got {len(seg_keep)}"
        )
    check_keeps(k, seg_keep)


def check_bounds(n: int, seg_bounds: list[int]) -> None:
    """Raise ValueError unless ``seg_bounds`` split an [.., n] output into segments: 0 = b0 < b1 < ... = n."""
    if len(seg_bounds) < 2 or seg_bounds[0] != 0 or seg_bounds[-1] != n:
        raise ValueError(
            f"seg_bounds must start at 0 and end at the output width {n}, got {list(seg_bounds)}; "
            f"use [0, {n}] for a plain projection"
        )
    if any(lo >= hi for lo, hi in zip(seg_bounds[:-1], seg_bounds[1:])):
        raise ValueError(f"seg_bounds must be strictly increasing, got {list(seg_bounds)}")


def check_keeps(k: int, seg_keep: list[int]) -> None:
    """Raise ValueError unless every keep is a channel count in [0, k]."""
    bad = [keep for keep in seg_keep if not 0 <= keep <= k]
    if bad:
        raise ValueError(f"every seg_keep entry must be in [0, {k}] (input channels), got {bad}")


def topk_mask(x: torch.Tensor, keep: int) -> torch.Tensor:
    """Bool [M, K]: per row, True at the ``keep`` largest |x|; among equal |x| the lower index wins."""
    if x.dim() != 2:
        raise ValueError(f"topk_mask expects a 2-D [tokens, channels] tensor, got shape {tuple(x.shape)}")
    if not 0 <= keep <= x.shape[1]:
        raise ValueError(f"keep must be in [0, {x.shape[1]}] (channels), got {keep}")
    order = torch.sort(x.abs(), dim=1, descending=True, stable=True).indices[:, :keep]
    return torch.zeros_like(x, dtype=torch.bool).scatter_(1, order, True)


def threshold_mask(x: torch.Tensor, thr: float | torch.Tensor) -> torch.Tensor:
    """Bool, True where |x| >= thr, compared in float32 (as the kernels compare). ``thr`` is a float,
    or a float32 tensor that broadcasts against x [M, K]: thresholds[:, None, None] gives one mask per
    segment, [S, M, K]."""
    if x.dim() != 2:
        raise ValueError(f"threshold_mask expects a 2-D [tokens, channels] tensor, got shape {tuple(x.shape)}")
    return x.abs().float() >= thr


def sparse_linear_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    seg_bounds: list[int],
    seg_keep: list[int],
) -> torch.Tensor:
    """[M, N] = per output segment i, (x * topk_mask(x, seg_keep[i])) @ weight[seg i].T (+ bias).

    ``weight`` is [N, K] (nn.Linear layout); accumulation in fp32, result in x.dtype.
    """
    n, k = _check_linear(x, weight)
    check_segments(n, k, seg_bounds, seg_keep)
    return masked_linear_ref(x, weight, bias, seg_bounds, [topk_mask(x, keep) for keep in seg_keep])


def threshold_linear_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    seg_bounds: list[int],
    thresholds: list[float] | torch.Tensor,
) -> torch.Tensor:
    """[M, N] = per output segment i, (x * threshold_mask(x, thresholds[i])) @ weight[seg i].T (+ bias).

    ``weight`` is [N, K] (nn.Linear layout); accumulation in fp32, result in x.dtype.
    """
    n, _ = _check_linear(x, weight)
    check_bounds(n, seg_bounds)
    thresholds = torch.as_tensor(thresholds, dtype=torch.float32, device=x.device)
    if thresholds.shape != (len(seg_bounds) - 1,):
        raise ValueError(
            f"thresholds needs one entry per segment ({len(seg_bounds) - 1} for seg_bounds {list(seg_bounds)}), "
            f"got shape {tuple(thresholds.shape)}"
        )
    return masked_linear_ref(x, weight, bias, seg_bounds, threshold_mask(x, thresholds[:, None, None]).unbind())


def _check_linear(x: torch.Tensor, weight: torch.Tensor) -> tuple[int, int]:
    """weight's (N, K), after checking x [M, K] against it."""
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(
            f"expected x [M, K] and weight [N, K], got x {tuple(x.shape)} and weight {tuple(weight.shape)}"
        )
    return weight.shape


def masked_linear_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    seg_bounds: list[int],
    masks: list[torch.Tensor],
) -> torch.Tensor:
    """[M, N]: output segment i from x where masks[i] (bool [M, K]), zero elsewhere; fp32 accumulation,
    the result in x.dtype. The body of both references above and of the reference forward's merged modules."""
    out = torch.empty(x.shape[0], weight.shape[0], dtype=torch.float32, device=x.device)
    for lo, hi, mask in zip(seg_bounds[:-1], seg_bounds[1:], masks):
        out[:, lo:hi] = torch.where(mask, x, 0).float() @ weight[lo:hi].float().T
    if bias is not None:
        out += bias.float()
    return out.to(x.dtype)
