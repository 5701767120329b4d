"""``sparse_linear``: TopK-sparse linear layer on the GPU, sparse GEMV or dense cuBLAS by batch size;
``threshold_linear``: the same with a threshold per segment instead of a TopK budget (no selection)."""

from __future__ import annotations

import torch

from .crossover import DEFAULT_MAX_SPARSE_M, GemvPath, load_crossover
from .measured import device_name
from .reference import check_bounds, check_segments, threshold_mask
from .sparse_gemv import MAX_TOKENS, sparse_gemv, threshold_gemv
from .topk_select import MAX_SEGMENTS, SHIPPED_OPTIONS, SelectOptions, keep_tensor, topk_select


def weight_sparsity(k: int, seg_bounds: list[int], seg_keep: list[int]) -> float:
    """Fraction of weight elements one token lets the kernel skip (segments weighted by width)."""
    kept = sum((hi - lo) * keep for lo, hi, keep in zip(seg_bounds[:-1], seg_bounds[1:], seg_keep))
    return 1.0 - kept / (k * seg_bounds[-1])


def gemv_path(m: int, n: int, k: int, seg_bounds: list[int], seg_keep: list[int], device: torch.device) -> GemvPath:
    """What ``sparse_linear`` runs for m tokens on ``device``: the choice of the crossover table
    measured on that GPU for this shape and sparsity, dense above the sparse GEMV's largest batch."""
    if m > MAX_TOKENS:
        return GemvPath.DENSE
    return load_crossover(device_name(device)).path(m, n, k, weight_sparsity(k, seg_bounds, seg_keep))


def largest_faster_step(n: int, k: int, seg_bounds: list[int], seg_keep: list[int], device: torch.device) -> int:
    """The most tokens ``sparse_linear`` runs faster than the dense layer at on ``device`` (0: not
    even one), by the crossover table measured on that GPU: policy auto leaves larger steps dense."""
    sparsity = weight_sparsity(k, seg_bounds, seg_keep)
    return min(MAX_TOKENS, load_crossover(device_name(device)).faster_up_to(n, k, sparsity))


def threshold_path(m: int, n: int, k: int, device: torch.device) -> GemvPath:
    """What ``threshold_linear`` runs for m tokens on ``device``. One token: the list loop over the
    channels each program compacts itself. No table measures threshold mode yet; the list is the
    rule because in TopK mode's H200 tile measurements (benchmarks/results/h200/gemv_plans.txt) it
    beat the walk at 50% and 80% sparsity for every 13B shape, and the walk's time barely falls with
    sparsity. More tokens: the walk up to the largest batch at which TopK mode's sparse GEMV beat
    cuBLAS on the sparsified input at every sparsity measured for this shape (the same contest: the
    sparsity thresholds give is only known on the device); above, x masked per segment and dense
    cuBLAS."""
    if m == 1:
        return GemvPath.LIST
    points = load_crossover(device_name(device)).points(n, k)
    walk_up_to = min((p.max_sparse_m for p in points), default=DEFAULT_MAX_SPARSE_M)
    return GemvPath.WALK if m <= min(max(1, walk_up_to), MAX_TOKENS) else GemvPath.DENSE


def _check_inputs(x: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None) -> None:
    if x.dim() != 2 or weight_t.dim() != 2 or x.shape[1] != weight_t.shape[0]:
        raise ValueError(
            f"sparse_linear expects x [M, K] and weight_t [K, N] (from prepare_weight), got x "
            f"{tuple(x.shape)} and weight_t {tuple(weight_t.shape)}"
        )
    if not weight_t.is_contiguous():
        raise ValueError("weight_t must be contiguous [K, N]: convert the weight once with prepare_weight")
    if x.dtype != weight_t.dtype or x.device != weight_t.device:
        raise ValueError(
            f"x and weight_t must share dtype and device, got {x.dtype}/{x.device} and "
            f"{weight_t.dtype}/{weight_t.device}"
        )
    if bias is not None and (bias.shape != (weight_t.shape[1],) or bias.device != x.device):
        raise ValueError(f"bias must be [{weight_t.shape[1]}] on {x.device}, got {tuple(bias.shape)} on {bias.device}")


def dense_on_sparsified(
    xs: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None, seg_bounds: list[int]
) -> torch.Tensor:
    """cuBLAS on x with each segment's dropped channels zeroed (xs [S, M, K]): a merged projection of
    a decode-sized batch runs one GEMM for all its copies (``batched_dense`` where the segments are
    equally wide, as Llama's QKV and gate_up, else ``stacked_dense``); a plain projection, or a larger
    batch (prefill: compute-bound, where stacking would multiply the work by S), runs one GEMM per
    segment."""
    if xs.shape[0] > 1 and xs.shape[1] <= MAX_TOKENS:
        widths = {hi - lo for lo, hi in zip(seg_bounds[:-1], seg_bounds[1:])}
        if len(widths) == 1:
            return batched_dense(xs, weight_t, bias)
        return stacked_dense(xs, weight_t, bias, seg_bounds)
    return per_segment_dense(xs, weight_t, bias, seg_bounds)


def batched_dense(xs: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Equally wide segments: one strided batched GEMM, segment i reading weight_t's columns
    [i*w, (i+1)*w) and writing the same columns of the [M, N] output in place (no copy follows):
    as fast as one GEMM on x, faster than ``stacked_dense`` (benchmarks/experiments/README.md)."""
    num_segs, m, k = xs.shape
    width = weight_t.shape[1] // num_segs
    out = torch.empty(m, weight_t.shape[1], dtype=xs.dtype, device=xs.device)
    torch.bmm(xs, weight_t.view(k, num_segs, width).transpose(0, 1), out=out.view(m, num_segs, width).transpose(0, 1))
    return out if bias is None else out.add_(bias)


def stacked_dense(
    xs: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None, seg_bounds: list[int]
) -> torch.Tensor:
    """One GEMM over all S copies stacked as [S*M, K] rows, then each segment's own rows: bound by
    weight reads, S*M rows cost what M rows cost, while a GEMM per segment pays its launch and tail
    S times (benchmarks/experiments/README.md)."""
    num_segs, m, k = xs.shape
    rows = xs.reshape(num_segs * m, k)
    out = rows @ weight_t if bias is None else torch.addmm(bias, rows, weight_t)
    bounds = zip(seg_bounds[:-1], seg_bounds[1:])
    return torch.cat([out[i * m : (i + 1) * m, lo:hi] for i, (lo, hi) in enumerate(bounds)], dim=1)


def per_segment_dense(
    xs: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None, seg_bounds: list[int]
) -> torch.Tensor:
    """One GEMM per segment on its own sparsified copy of x."""
    parts = [xs[i] @ weight_t[:, lo:hi] for i, (lo, hi) in enumerate(zip(seg_bounds[:-1], seg_bounds[1:]))]
    out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
    return out if bias is None else out + bias


def sparse_linear(
    x: torch.Tensor,
    weight_t: torch.Tensor,
    bias: torch.Tensor | None,
    seg_bounds: list[int],
    seg_keep: list[int],
    keep: torch.Tensor | None = None,
    path: GemvPath | None = None,
    thr_guess: torch.Tensor | None = None,
    options: SelectOptions = SHIPPED_OPTIONS,
) -> torch.Tensor:
    """[M, N]: output columns [seg_bounds[i], seg_bounds[i+1]) see x with only its seg_keep[i]
    largest-|x| channels per token; same semantics as ``reference.sparse_linear_ref`` on weight_t.T.

    weight_t is [K, N] from ``prepare_weight``. Two launches (selection, then the sparse GEMV or
    dense cuBLAS on the sparsified input), the path as ``gemv_path`` picks it unless ``path`` is
    given. No host sync: CUDA-graph safe. ``keep``, the same budgets as ``keep_tensor(seg_keep)``,
    is what the kernels read: pass a persistent one so a captured or compiled graph reads budgets
    from memory instead of baking them in (``seg_keep`` then only picks the path). ``thr_guess``
    (int32 [S], zeros to start, one per call site): the selection starts from the threshold it left
    there the last call, faster where consecutive tokens' thresholds are close, exact either way.
    ``options`` (``SelectOptions``): how the selection splits its work and launches, speed only.
    """
    _check_inputs(x, weight_t, bias)
    k, n = weight_t.shape
    check_segments(n, k, seg_bounds, seg_keep)
    keep = keep_tensor(seg_keep, x.device) if keep is None else keep
    path = gemv_path(x.shape[0], n, k, seg_bounds, seg_keep, x.device) if path is None else path
    sel = topk_select(x, keep, with_list=path is GemvPath.LIST, thr_guess=thr_guess, options=options)
    if path is GemvPath.DENSE:
        return dense_on_sparsified(sel.xs, weight_t, bias, seg_bounds)
    return sparse_gemv(sel, weight_t, bias, seg_bounds)


def threshold_linear(
    x: torch.Tensor,
    weight_t: torch.Tensor,
    bias: torch.Tensor | None,
    seg_bounds: list[int],
    thresholds: torch.Tensor,
    path: GemvPath | None = None,
) -> torch.Tensor:
    """[M, N]: output columns [seg_bounds[i], seg_bounds[i+1]) see x with only the channels where
    |x| >= thresholds[i] (compared in float32), per token; same semantics as
    ``reference.threshold_linear_ref`` on weight_t.T.

    weight_t is [K, N] from ``prepare_weight``; ``thresholds`` float32 [S] on x's device, read by the
    kernels, so a captured or compiled graph takes thresholds written into it later. The path is
    ``threshold_path``'s unless ``path`` forces one: LIST (one token only: each GEMV program
    compacts its share of the kept channels into a list and runs the list loop over it) and WALK
    (the sparse GEMV masking x as it reads it) are one launch; DENSE masks x once per segment and
    runs dense cuBLAS. No host sync: CUDA-graph safe.
    """
    _check_inputs(x, weight_t, bias)
    k, n = weight_t.shape
    check_bounds(n, seg_bounds)
    num_segs = len(seg_bounds) - 1
    if num_segs > MAX_SEGMENTS:
        raise ValueError(f"1 to {MAX_SEGMENTS} output segments are supported, got {num_segs}")
    if thresholds.shape != (num_segs,) or thresholds.dtype != torch.float32 or thresholds.device != x.device:
        raise ValueError(
            f"thresholds must be float32 [{num_segs}] (one per segment) on {x.device}, got {thresholds.dtype} "
            f"{tuple(thresholds.shape)} on {thresholds.device}"
        )
    path = threshold_path(x.shape[0], n, k, x.device) if path is None else path
    if path is GemvPath.DENSE:
        xs = torch.where(threshold_mask(x, thresholds[:, None, None]), x, 0)
        return dense_on_sparsified(xs, weight_t, bias, seg_bounds)
    return threshold_gemv(x, thresholds, weight_t, bias, seg_bounds, with_list=path is GemvPath.LIST)
