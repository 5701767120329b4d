"""Where a one-token call's microseconds go: the selection, the GEMV, and what joining them costs;
and how fast batch-1 decode could get if the selection cost nothing.

    python3 -m benchmarks.handoff_costs [--rest-us 1282 --dense-step-us 8208]        # needs CUDA

At the 13B shapes, M = 1, the channel-list path, per call:

* ``select``: ``topk_select`` with the channel list, alone;
* ``gemv``: the list GEMV alone, on a selection made beforehand (its list already in memory);
* ``both``: ``sparse_linear`` (selection, then the GEMV as shipped);
* ``join``: both - select - gemv, what running them back to back adds (negative: overlap);
* ``ideal``: cuBLAS reading exactly the kept weight rows (the first keep rows of [K, N], contiguous):
  the same bytes without selection, list or gather;
* ``dense``: cuBLAS on the whole weight.

Then per decoder layer (qkv + o + gate_up + down) the sums of dense, shipped (``both``), ``free``:
the list GEMV alone (a selection that costs nothing, today's GEMV), and ``best``: min(gemv, ideal) a
call, a free selection and the faster of the list GEMV and cuBLAS on the kept bytes. A batch-1 step
of the 13B shape is 40 layers plus ``--rest-us`` of kernel time outside the projections and
selections (attention, norms, rotary, cache writes, lm_head; 1282 us in
results/h200/profile_decode_13b_08.txt at 80%), against a dense step of ``--dense-step-us`` (8208 us
of wall time, results/h200/profile_decode_13b.txt); ``bound`` is dense step / (rest + 40 best
layers), the speedup decode would reach with that rest, ``free bound`` the same with the ``free``
layers; ``model`` is the same sum with the shipped calls, to check against the measured decode
speedup (results/h200/decode_13b.txt).

Timing: ``benchmarks.common.time_us`` (CUDA graph, L2 flushed, median microseconds per call).
"""

from __future__ import annotations

import argparse
import functools

import torch

import acttail_kernels as ak
from acttail_kernels.sparse_gemv import sparse_gemv
from acttail_kernels.topk_select import Selection, guess_tensor, keep_tensor, topk_select
from benchmarks.common import Shape, keeps_for, random_inputs, random_instances, shapes_of, time_us

LAYER = ("qkv", "q/k/v/o", "gate_up", "down")  # a decoder layer's four calls
LAYERS = 40


def in_layer(shape: Shape) -> bool:
    """Whether ``shape`` is one of a decoder layer's four calls."""
    return shape.name.removeprefix(f"{shape.model}.") in LAYER


def add_step_args(parser: argparse.ArgumentParser) -> None:
    """--rest-us and --dense-step-us of the batch-1 step model (``step_speedup``)."""
    parser.add_argument("--rest-us", type=float, default=1282.0, help="a step's kernel time outside the projections")
    parser.add_argument("--dense-step-us", type=float, default=8208.0, help="a dense decode step, wall time")


def step_speedup(layer_us: float, args: argparse.Namespace) -> float:
    """Dense step / (rest + LAYERS layers of ``layer_us``): a batch-1 step's speedup with these calls."""
    return args.dense_step_us / (args.rest_us + LAYERS * layer_us)


def dense_calls(xs: list[torch.Tensor], weights: list[torch.Tensor]) -> list:
    """cuBLAS on the whole weight ([N, K]), one call per instance."""
    return [functools.partial(torch.nn.functional.linear, x, w) for x, w in zip(xs, weights)]


def ideal_calls(xs: list[torch.Tensor], weights_t: list[torch.Tensor], keeps: list[int]) -> list:
    """cuBLAS reading exactly the kept weight rows: the first max(keeps) rows of [K, N], contiguous."""
    rows = max(keeps)  # the bench's budgets are one per shape
    return [functools.partial(torch.mm, x[:, :rows], w[:rows]) for x, w in zip(xs, weights_t)]


def select_calls(xs: list[torch.Tensor], keep: torch.Tensor, guess: torch.Tensor) -> list:
    """``topk_select`` with the channel list, alone."""
    return [functools.partial(topk_select, x, keep, True, guess) for x in xs]


def gemv_calls(selections: list[Selection], weights_t: list[torch.Tensor], shape: Shape) -> list:
    """The sparse GEMV alone, on selections made beforehand."""
    return [functools.partial(sparse_gemv, sel, w, None, shape.seg_bounds) for sel, w in zip(selections, weights_t)]


def shipped_calls(
    xs: list[torch.Tensor],
    weights_t: list[torch.Tensor],
    shape: Shape,
    keeps: list[int],
    keep: torch.Tensor,
    guess: torch.Tensor,
    path: ak.GemvPath | None,
) -> list:
    """``sparse_linear`` as shipped (selection, then ``path``, the dispatch's if None)."""
    return [
        functools.partial(ak.sparse_linear, x, w, None, shape.seg_bounds, keeps, keep=keep, path=path, thr_guess=guess)
        for x, w in zip(xs, weights_t)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_step_args(parser)
    args = parser.parse_args()
    dtype, device = torch.bfloat16, "cuda"
    print(
        f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {dtype}; microseconds per call, M = 1, list path"
    )
    print(f"{'shape':14s} {'s':>4s} {'select':>7s} {'gemv':>7s} {'both':>7s} {'join':>7s} {'ideal':>7s} {'dense':>7s}")
    layer: dict[float, dict[str, float]] = {}
    for shape in shapes_of("13b"):
        weights, weights_t = random_instances(shape, dtype, device)
        xs = random_inputs(1, shape.k, len(weights), dtype, device)
        dense = time_us(dense_calls(xs, weights), xs)
        for sparsity in (0.5, 0.8):
            keeps = keeps_for(shape, sparsity)
            keep = keep_tensor(keeps, device)
            guess = guess_tensor(len(keeps), device)
            select = select_calls(xs, keep, guess)
            gemv = gemv_calls([call() for call in select], weights_t, shape)
            both = shipped_calls(xs, weights_t, shape, keeps, keep, guess, ak.GemvPath.LIST)
            ideal = ideal_calls(xs, weights_t, keeps)
            t = {
                name: time_us(calls, xs)
                for name, calls in (("select", select), ("gemv", gemv), ("both", both), ("ideal", ideal))
            }
            join = t["both"] - t["select"] - t["gemv"]
            print(
                f"{shape.name:14s} {sparsity:4.2f} {t['select']:7.1f} {t['gemv']:7.1f} {t['both']:7.1f} {join:7.1f} "
                f"{t['ideal']:7.1f} {dense:7.1f}",
                flush=True,
            )
            if in_layer(shape):
                sums = layer.setdefault(sparsity, {"dense": 0.0, "shipped": 0.0, "free": 0.0, "best": 0.0})
                sums["dense"] += dense
                sums["shipped"] += t["both"]
                sums["free"] += t["gemv"]
                sums["best"] += min(t["gemv"], t["ideal"])
    print(
        f"\nper layer ({' + '.join(LAYER)}), us; step = {args.rest_us:.0f} + {LAYERS} layers, "
        f"against a dense step of {args.dense_step_us:.0f}"
    )
    print(
        f"{'s':>4s} {'dense':>7s} {'shipped':>8s} {'free':>7s} {'best':>7s} {'model':>7s} {'free bound':>10s} "
        f"{'bound':>7s}"
    )
    for sparsity, sums in layer.items():
        model, free, bound = (step_speedup(sums[key], args) for key in ("shipped", "free", "best"))
        print(
            f"{sparsity:4.2f} {sums['dense']:7.1f} {sums['shipped']:8.1f} {sums['free']:7.1f} {sums['best']:7.1f} "
            f"{model:6.2f}x {free:9.2f}x {bound:6.2f}x"
        )


if __name__ == "__main__":
    main()
