"""Threshold mode (TEAL's rule, ``threshold_linear``: one launch, no selection) against the shipped TopK
calls at the 13B shapes, and what it would make of a batch-1 decode step.

    python3 -m benchmarks.experiments.threshold_gemv [--rest-us 1282 --dense-step-us 8208]   # needs CUDA
    TRITON_INTERPRET=1 python3 -m benchmarks.experiments.threshold_gemv --dry-run           # CPU: checks the script

Each call's thresholds are the s-quantile of |x| of its own input, the same for every segment, so a
segment keeps about 1 - s of the channels (``kept``: the fraction it actually kept). Per call,
microseconds, M = 1, a decoder layer's four projections:

* ``threshold``: ``threshold_linear``, the walk masking x by the thresholds;
* ``thr list``: ``threshold_linear`` on its one-token default, each program compacting its share of
  the kept channels into a list, then the list loop;
* ``exact``: ``sparse_linear`` as shipped, list path (``both`` in benchmarks/handoff_costs.py);
* ``gemv``, ``ideal``, ``dense``: the list GEMV on a selection made beforehand, cuBLAS on exactly the
  kept rows, cuBLAS on the whole weight (as in handoff_costs).

Then per layer and the batch-1 step model of handoff_costs: ``model`` of the exact, threshold (walk)
and thr list calls, and ``ceiling``, the model with min(gemv, ideal) a call (a free selection).

For M = 4 and 16 (thresholds: the s-quantile over the batch): the threshold walk (``walk``), x masked
per segment and cuBLAS (``masked``), the shipped call on its dispatch's path (``exact``) and
``dense``; ``path`` is what ``threshold_path`` picks for threshold mode.

Timing: ``benchmarks.common.time_us`` (CUDA graph, L2 flushed, median microseconds per call).
"""

from __future__ import annotations

import argparse
import functools
import sys

import torch

import acttail_kernels as ak
from acttail_kernels.reference import threshold_mask
from acttail_kernels.topk_select import guess_tensor, keep_tensor, triton_interpreted
from benchmarks.common import Shape, decoder_shapes, keeps_for, random_inputs, random_instances, shapes_of, time_us
from benchmarks.handoff_costs import (
    LAYER,
    LAYERS,
    add_step_args,
    dense_calls,
    gemv_calls,
    ideal_calls,
    in_layer,
    select_calls,
    shipped_calls,
    step_speedup,
)

SPARSITIES = (0.5, 0.8)
BATCHES = (4, 16)


def quantile_thresholds(x: torch.Tensor, shape: Shape, sparsity: float) -> torch.Tensor:
    """float32 [S]: the ``sparsity``-quantile of |x| for every segment."""
    return torch.quantile(x.abs().float().flatten(), sparsity).repeat(len(shape.seg_widths)).contiguous()


def kept_fraction(xs: list[torch.Tensor], thresholds: list[torch.Tensor]) -> float:
    """Mean fraction of the entries of x the thresholds keep, over instances and segments."""
    return sum(threshold_mask(x, thr[:, None, None]).float().mean().item() for x, thr in zip(xs, thresholds)) / len(xs)


def budgets_of(xs: list[torch.Tensor], shape: Shape, sparsity: float, device: str) -> tuple:
    """Both modes' budgets for these inputs at ``sparsity``: TopK's keeps (as a list, the kernels'
    tensor and a fresh threshold guess) and each input's quantile thresholds."""
    keeps = keeps_for(shape, sparsity)
    thresholds = [quantile_thresholds(x, shape, sparsity) for x in xs]
    return keeps, keep_tensor(keeps, device), guess_tensor(len(keeps), device), thresholds


def threshold_calls(
    xs: list[torch.Tensor],
    weights_t: list[torch.Tensor],
    shape: Shape,
    thresholds: list[torch.Tensor],
    path: ak.GemvPath | None,
) -> list:
    """``threshold_linear`` on ``path`` (the dispatch's if None), one call per instance."""
    return [
        functools.partial(ak.threshold_linear, x, w, None, shape.seg_bounds, thr, path=path)
        for x, w, thr in zip(xs, weights_t, thresholds)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_step_args(parser)
    parser.add_argument(
        "--dry-run", action="store_true", help="tiny shapes, fp32, two instances, on CPU under TRITON_INTERPRET=1"
    )
    args = parser.parse_args()
    print(" ".join(["python3 -m benchmarks.experiments.threshold_gemv", *sys.argv[1:]]), flush=True)
    if args.dry_run:
        if not triton_interpreted():
            raise SystemExit("--dry-run runs the kernels in Triton's interpreter: set TRITON_INTERPRET=1")
        dtype, device, shapes, instances = torch.float32, "cpu", decoder_shapes("tiny", 48, 80), 2
        print(f"dry run: tiny shapes on CPU, {dtype}; microseconds are wall clock of the interpreter")
    else:
        if not torch.cuda.is_available():
            raise SystemExit("needs CUDA (or --dry-run under TRITON_INTERPRET=1 on CPU)")
        dtype, device, shapes, instances = torch.bfloat16, "cuda", shapes_of("13b"), None
        print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {dtype}; microseconds per call")
    shapes = [shape for shape in shapes if in_layer(shape)]

    print("\nM = 1")
    print(
        f"{'shape':14s} {'s':>4s} {'kept':>5s} {'threshold':>9s} {'thr list':>8s} {'exact':>7s} {'gemv':>7s} "
        f"{'ideal':>7s} {'dense':>7s}"
    )
    batch_rows = []
    layer: dict[float, dict[str, float]] = {}
    for shape in shapes:
        weights, weights_t = random_instances(shape, dtype, device)
        weights, weights_t = weights[:instances], weights_t[:instances]
        xs = random_inputs(1, shape.k, len(weights), dtype, device)
        dense = time_us(dense_calls(xs, weights), xs)
        for sparsity in SPARSITIES:
            keeps, keep, guess, thresholds = budgets_of(xs, shape, sparsity, device)
            calls = {
                "threshold": threshold_calls(xs, weights_t, shape, thresholds, ak.GemvPath.WALK),
                "thr list": threshold_calls(xs, weights_t, shape, thresholds, ak.GemvPath.LIST),
                "exact": shipped_calls(xs, weights_t, shape, keeps, keep, guess, ak.GemvPath.LIST),
                "gemv": gemv_calls([call() for call in select_calls(xs, keep, guess)], weights_t, shape),
                "ideal": ideal_calls(xs, weights_t, keeps),
            }
            t = {name: time_us(call, xs) for name, call in calls.items()}
            print(
                f"{shape.name:14s} {sparsity:4.2f} {kept_fraction(xs, thresholds):5.3f} {t['threshold']:9.1f} "
                f"{t['thr list']:8.1f} {t['exact']:7.1f} {t['gemv']:7.1f} {t['ideal']:7.1f} {dense:7.1f}",
                flush=True,
            )
            sums = layer.setdefault(sparsity, dict.fromkeys(("dense", "exact", "threshold", "thr list", "best"), 0.0))
            sums["dense"] += dense
            for key in ("exact", "threshold", "thr list"):
                sums[key] += t[key]
            sums["best"] += min(t["gemv"], t["ideal"])
        for m in BATCHES:
            xs = random_inputs(m, shape.k, len(weights), dtype, device)
            dense = time_us(dense_calls(xs, weights), xs)
            for sparsity in SPARSITIES:
                keeps, keep, guess, thresholds = budgets_of(xs, shape, sparsity, device)
                t = {
                    "walk": time_us(threshold_calls(xs, weights_t, shape, thresholds, ak.GemvPath.WALK), xs),
                    "masked": time_us(threshold_calls(xs, weights_t, shape, thresholds, ak.GemvPath.DENSE), xs),
                    "exact": time_us(shipped_calls(xs, weights_t, shape, keeps, keep, guess, None), xs),
                }
                path = ak.threshold_path(m, shape.n, shape.k, torch.device(device))
                exact_path = ak.gemv_path(m, shape.n, shape.k, shape.seg_bounds, keeps, torch.device(device))
                batch_rows.append(
                    f"{shape.name:14s} {m:3d} {sparsity:4.2f} {kept_fraction(xs, thresholds):5.3f} "
                    f"{path.value:>6s} {t['walk']:7.1f} {t['masked']:7.1f} {t['exact']:7.1f} "
                    f"{exact_path.value:>6s} {dense:7.1f}"
                )

    print(
        f"\nper layer ({' + '.join(LAYER)}), us; step = {args.rest_us:.0f} + {LAYERS} layers, "
        f"against a dense step of {args.dense_step_us:.0f}"
    )
    print(
        f"{'s':>4s} {'dense':>7s} {'exact':>7s} {'threshold':>9s} {'thr list':>8s} {'best':>7s} "
        f"{'model exact':>11s} {'model threshold':>15s} {'model thr list':>14s} {'ceiling':>7s}"
    )
    for sparsity, sums in layer.items():
        exact, threshold, thr_list, ceiling = (
            step_speedup(sums[key], args) for key in ("exact", "threshold", "thr list", "best")
        )
        print(
            f"{sparsity:4.2f} {sums['dense']:7.1f} {sums['exact']:7.1f} {sums['threshold']:9.1f} "
            f"{sums['thr list']:8.1f} {sums['best']:7.1f} {exact:10.2f}x {threshold:14.2f}x {thr_list:13.2f}x "
            f"{ceiling:6.2f}x"
        )

    print("\nsmall batches (path: threshold_path's choice for threshold mode; exact on the dispatch's path)")
    print(
        f"{'shape':14s} {'M':>3s} {'s':>4s} {'kept':>5s} {'path':>6s} {'walk':>7s} {'masked':>7s} {'exact':>7s} "
        f"{'(path)':>6s} {'dense':>7s}"
    )
    print("\n".join(batch_rows))


if __name__ == "__main__":
    main()
