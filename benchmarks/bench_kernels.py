"""Benchmark the TopK-sparse GEMV against dense cuBLAS: the kernel table.

On a CUDA GPU (needs only torch + triton + pydantic):

    python3 -m benchmarks.bench_kernels                 # all 7B/13B shapes, M 1-16, s 0.5-0.9
    python3 -m benchmarks.bench_kernels --quick         # 13B q/o, gate and down; M 1,4; s 0.5,0.8
    python3 -m benchmarks.bench_kernels --check         # full-size bf16 correctness pass first
    python3 -m benchmarks.bench_kernels --check-only    # the correctness pass alone

``python3 -m tools.tune_crossover`` measures the same table and writes the batch-size crossover from
it. On CPU it runs tiny shapes through Triton's interpreter (TRITON_INTERPRET=1 is set for you), to
check that the script works; its timings mean nothing.

Timing: every variant is captured in a CUDA graph (as vLLM runs decode) and its replays are timed
with triton.testing.do_bench, median, L2 flushed before each replay (``common.time_us``). "sparse"
is selection + GEMV (forced, whatever the crossover says; for one token the faster of its two
loops, the channel list and the walk over all channels, "path"); "fallback" is selection + cuBLAS
on the sparsified input (what sparse_linear runs above the crossover); "dense" is plain cuBLAS
F.linear. Effective TB/s counts the weight rows the batch must read: the union over its tokens'
kept channels per segment.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from dataclasses import dataclass

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels load

import triton  # noqa: E402

import acttail_kernels as ak  # noqa: E402
from acttail_kernels import reference  # noqa: E402
from acttail_kernels.sparse_gemv import sparse_gemv  # noqa: E402
from acttail_kernels.topk_select import guess_tensor, keep_tensor, pdl_launch, topk_select  # noqa: E402
from benchmarks.common import (  # noqa: E402
    ALL_SHAPES,
    GPU_SHAPES,
    Shape,
    keeps_for,
    random_inputs,
    random_instances,
    time_us,
)

QUICK_SHAPES = [s for s in GPU_SHAPES if s.name in ("13b.q/k/v/o", "13b.gate/up", "13b.down")]
CPU_SHAPES = [Shape("tiny", (48,), 64), Shape("tiny.qkv", (16, 24, 8), 40)]


def needed_bytes(x: torch.Tensor, shape: Shape, keeps: list[int], elem: int) -> int:
    """Weight bytes the batch must read: per segment, the union of its tokens' kept channels."""
    rows = [int(reference.topk_mask(x, keep).any(dim=0).sum()) for keep in keeps]
    return elem * sum(r * w for r, w in zip(rows, shape.seg_widths))


@dataclass
class Row:
    shape: Shape
    m: int
    sparsity: float
    dense_us: float
    sparse_us: float  # the faster sparse path
    fallback_us: float
    needed: int
    one_token_walk: bool = False  # one token: the walk beat the channel list

    @property
    def speedup(self) -> float:
        return self.dense_us / self.sparse_us

    @property
    def tb_per_s(self) -> float:
        return self.needed / self.sparse_us / 1e6


def measure(shape: Shape, m: int, sparsities: list[float], dtype: torch.dtype, device: str) -> list[Row]:
    """One Row per sparsity for this shape and batch size (dense timed once, shared)."""
    elem = torch.finfo(dtype).bits // 8
    weights, weights_t = random_instances(shape, dtype, device)
    instances = len(weights)
    xs = random_inputs(m, shape.k, instances, dtype, device)
    bounds = shape.seg_bounds

    def timed(fn, weights_or_t) -> float:
        return time_us([functools.partial(fn, x, w) for x, w in zip(xs, weights_or_t)], xs)

    def forced(keeps, keep, guess, path, x, weight_t):  # selection + this path, whatever the crossover says
        return ak.sparse_linear(x, weight_t, None, bounds, keeps, keep=keep, path=path, thr_guess=guess)

    dense_us = timed(torch.nn.functional.linear, weights)
    rows = []
    for sparsity in sparsities:
        keeps = keeps_for(shape, sparsity)
        keep = keep_tensor(keeps, device)
        guess = guess_tensor(len(keeps), device)  # as a vLLM layer keeps one: warm after the first call
        walk_us = timed(functools.partial(forced, keeps, keep, guess, ak.GemvPath.WALK), weights_t)
        list_us = (
            timed(functools.partial(forced, keeps, keep, guess, ak.GemvPath.LIST), weights_t) if m == 1 else walk_us
        )
        rows.append(
            Row(
                shape=shape,
                m=m,
                sparsity=sparsity,
                dense_us=dense_us,
                sparse_us=min(walk_us, list_us),
                fallback_us=timed(functools.partial(forced, keeps, keep, guess, ak.GemvPath.DENSE), weights_t),
                needed=sum(needed_bytes(x, shape, keeps, elem) for x in xs) // instances,
                one_token_walk=m == 1 and walk_us < list_us,
            )
        )
        print(f"  measured {shape.name} M={m} s={sparsity}: list {list_us:.1f} us, walk {walk_us:.1f} us", flush=True)
    return rows


def check(shapes: list[Shape], dtype: torch.dtype, device: str) -> bool:
    """Both paths against the reference: exact kept sets, every output written, small rel. error."""
    ok = True
    tol = 2e-2 if dtype == torch.bfloat16 else 2e-3
    for shape in shapes:
        weight = torch.randn(shape.n, shape.k, dtype=dtype, device=device) * 0.02
        weight_t = ak.prepare_weight(weight)
        bias = torch.randn(shape.n, dtype=dtype, device=device)
        for m in (1, 2, 3, 5, 8, 16):
            for sparsity in (0.0, 0.5, 0.8, 0.95):
                x = torch.randn(m, shape.k, dtype=dtype, device=device)
                x[:, : shape.k // 4] = x[:, : shape.k // 4].round()  # many exact ties, zeros among them
                keeps = keeps_for(shape, sparsity)
                ref = reference.sparse_linear_ref(x, weight, bias, shape.seg_bounds, keeps).float()
                sel = topk_select(x, keep_tensor(keeps, device), with_list=m == 1)
                exact_sets = all(
                    torch.equal(sel.xs[i], torch.where(reference.topk_mask(x, keep), x, 0))
                    for i, keep in enumerate(keeps)
                )
                out = torch.full((m, shape.n), float("nan"), dtype=dtype, device=device)
                sparse_gemv(sel, weight_t, bias, shape.seg_bounds, out=out)
                # then the other paths: dense fallback, and for one token the walk over all channels
                outs = [out] + [
                    ak.sparse_linear(x, weight_t, bias, shape.seg_bounds, keeps, path=path)
                    for path in [ak.GemvPath.DENSE] + ([ak.GemvPath.WALK] if m == 1 else [])
                ]
                errs = [((y.float() - ref).norm() / ref.norm()).item() for y in outs]
                good = exact_sets and all(e < tol for e in errs)  # NaN (unwritten) fails `<`
                ok &= good
                if not good or m == 1:
                    print(
                        f"check {shape.name:14s} M={m:2d} s={sparsity:.2f} exact_sets={exact_sets} "
                        f"rel_err sparse={errs[0]:.1e} fallback={errs[1]:.1e} "
                        + (f"walk={errs[2]:.1e} " if m == 1 else "")
                        + ("ok" if good else "FAIL")
                    )
    return ok


def print_kernel_table(rows: list[Row]) -> None:
    print("\n(a) sparse (selection + GEMV) vs dense cuBLAS; TB/s on the bytes the batch must read")
    print(
        f"{'shape':14s} {'N':>6s} {'K':>6s} {'M':>3s} {'s':>5s} {'dense us':>9s} {'sparse us':>9s} {'path':>4s} "
        f"{'fallbk us':>9s} {'speedup':>7s} {'TB/s':>6s}"
    )
    for r in rows:
        path = "walk" if r.m > 1 or r.one_token_walk else "list"
        print(
            f"{r.shape.name:14s} {r.shape.n:6d} {r.shape.k:6d} {r.m:3d} {r.sparsity:5.2f} {r.dense_us:9.1f} "
            f"{r.sparse_us:9.1f} {path:>4s} {r.fallback_us:9.1f} {r.speedup:6.2f}x {r.tb_per_s:6.2f}"
        )


def add_table_args(parser: argparse.ArgumentParser) -> None:
    """The grid of the kernel table, and its correctness pass."""
    parser.add_argument("--quick", action="store_true", help="13B q/o, gate and down; M 1,4; s 0.5,0.8")
    parser.add_argument("--check", action="store_true", help="full-size correctness pass before timing")
    parser.add_argument(
        "--shapes", nargs="*", help="shape or model names to run (13b.down, llama3-8b; default: 7b 13b)"
    )
    parser.add_argument("--ms", type=int, nargs="*", help="batch sizes (default 1 2 4 8 16)")
    parser.add_argument("--sparsities", type=float, nargs="*", help="default 0.5 0.7 0.8 0.9")


def kernel_table(args: argparse.Namespace, timing: bool = True) -> list[Row] | None:
    """What this GPU runs, the correctness pass (with ``args.check``, or alone without ``timing``),
    then the kernel table, printed and returned; None where the kernels cannot run or the check
    failed."""
    on_gpu = torch.cuda.is_available()
    device = "cuda" if on_gpu else "cpu"
    dtype = torch.bfloat16 if on_gpu else torch.float16  # bf16 gives NaN in the interpreter
    shapes = (QUICK_SHAPES if args.quick else GPU_SHAPES) if on_gpu else CPU_SHAPES
    if args.shapes:
        shapes = [s for s in ALL_SHAPES + CPU_SHAPES if s.name in args.shapes or s.model in args.shapes]
    ms = args.ms or ([1, 4] if args.quick else [1, 2, 4, 8, 16])
    sparsities = args.sparsities or ([0.5, 0.8] if args.quick else [0.5, 0.7, 0.8, 0.9])
    available, reason = ak.kernels_available(device)
    device_name = torch.cuda.get_device_name() if on_gpu else "cpu (Triton interpreter)"
    pdl = "PDL" if pdl_launch(torch.device(device)) else "no PDL"
    print(f"{device_name}: {reason}; torch {torch.__version__}, triton {triton.__version__}, {dtype}, {pdl}")
    if not available:
        return None

    torch.manual_seed(0)
    if args.check or not timing:
        if not check(shapes, dtype, device):
            print("CHECK FAILED")
            return None
        print("check passed")
        if not timing:
            return []
    rows = [row for shape in shapes for m in ms for row in measure(shape, m, sparsities, dtype, device)]
    print_kernel_table(rows)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_table_args(parser)
    parser.add_argument("--check-only", action="store_true", help="correctness pass, no timing")
    args = parser.parse_args()
    return 0 if kernel_table(args, timing=not args.check_only) is not None else 1


if __name__ == "__main__":
    sys.exit(main())
