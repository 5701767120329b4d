"""Benchmark the TopK-sparse GEMV against dense cuBLAS; measure and write the batch-size crossover.

On a CUDA GPU (needs only torch + triton + pydantic):

    python3 benchmarks/bench_kernels.py                 # table (a) + crossover table, all shapes
    python3 benchmarks/bench_kernels.py --quick         # 13B q/o, gate and down; M 1,4; s 0.5,0.8
    python3 benchmarks/bench_kernels.py --write-crossover   # kernels/measured/<this GPU>/crossover.json
    python3 benchmarks/bench_kernels.py --check         # full-size bf16 correctness pass first

On CPU it runs tiny shapes through Triton's interpreter (TRITON_INTERPRET=1 is set for you), to
check that the script works; its timings mean nothing.

Timing: every variant is captured in a CUDA graph (as vLLM runs decode) and its replays are timed
with triton.testing.do_bench, median, L2 flushed before each replay. "sparse" is selection + GEMV
(forced, whatever the crossover says; for one token the faster of its two loops, the channel list
and the walk over all channels, "path"); "fallback" is selection + cuBLAS on the sparsified input
(what sparse_linear runs above the crossover); "dense" is plain cuBLAS F.linear. Effective TB/s
counts the weight rows the batch must read: the union over its tokens' kept channels per segment.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels load

try:
    import acttail_kernels as ak
except ImportError:
    sys.exit("acttail_kernels is not installed: run `pip install --no-deps --no-build-isolation -e .` in the repo")

import triton  # noqa: E402

from acttail_kernels import reference  # noqa: E402
from acttail_kernels.crossover import CROSSOVER_FILE, CrossoverPoint, CrossoverTable, ShapeCrossover  # noqa: E402
from acttail_kernels.measured import table_path  # noqa: E402
from acttail_kernels import topk_select as select_module  # noqa: E402
from acttail_kernels.sparse_gemv import sparse_gemv  # noqa: E402
from acttail_kernels.topk_select import guess_tensor, keep_tensor, topk_select  # noqa: E402


@dataclass(frozen=True)
class Shape:
    name: str
    seg_widths: tuple[int, ...]  # output segments (one for a plain projection)
    k: int

    @property
    def n(self) -> int:
        return sum(self.seg_widths)

    @property
    def seg_bounds(self) -> list[int]:
        bounds = [0]
        for width in self.seg_widths:
            bounds.append(bounds[-1] + width)
        return bounds


def llama_shapes(tag: str, hidden: int, inter: int) -> list[Shape]:
    return [
        Shape(f"{tag}.q/k/v/o", (hidden,), hidden),
        Shape(f"{tag}.qkv", (hidden, hidden, hidden), hidden),
        Shape(f"{tag}.gate/up", (inter,), hidden),
        Shape(f"{tag}.gate_up", (inter, inter), hidden),
        Shape(f"{tag}.down", (hidden,), inter),
    ]


GPU_SHAPES = llama_shapes("7b", 4096, 11008) + llama_shapes("13b", 5120, 13824)
QUICK_SHAPES = [s for s in GPU_SHAPES if s.name in ("13b.q/k/v/o", "13b.gate/up", "13b.down")]
L2_BYTES = 50 * 2**20
CPU_SHAPES = [Shape("tiny", (48,), 64), Shape("tiny.qkv", (16, 24, 8), 40)]


def time_us(calls: list, inputs: list[torch.Tensor]) -> float:
    """Median microseconds per call. Each call's input is first rewritten in place, as the previous
    op of a decoder layer leaves it in L2; that rewrite is timed alone and subtracted. All calls (one
    per problem instance, distinct weights: no L2 reuse between them) go in one CUDA graph whose
    replays are timed, L2 flushed before each. Wall clock on CPU."""
    if not torch.cuda.is_available():
        for call in calls:
            call()  # compile
        start = time.perf_counter()
        for call in calls:
            call()
        return (time.perf_counter() - start) * 1e6 / len(calls)

    def replay_us(steps) -> float:
        for step in steps:
            step()  # compile, and allocate the tickets before capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for step in steps:
                step()
        return triton.testing.do_bench(graph.replay, warmup=10, rep=50, return_mode="median") * 1e3

    rewrites = [functools.partial(torch.Tensor.mul_, x, 1.0) for x in inputs]
    both = [step for pair in zip(rewrites, calls) for step in pair]
    return (replay_us(both) - replay_us(rewrites)) / len(calls)


def keeps_for(shape: Shape, sparsity: float) -> list[int]:
    return [round((1.0 - sparsity) * shape.k)] * len(shape.seg_widths)


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
    # Enough instances that their weights overflow L2 (50 MB on H100) about four times over.
    instances = min(16, max(2, -(-4 * L2_BYTES // (shape.n * shape.k * elem))))
    weights = [torch.randn(shape.n, shape.k, dtype=dtype, device=device) * 0.02 for _ in range(instances)]
    weights_t = [ak.prepare_weight(w) for w in weights]
    xs = [torch.randn(m, shape.k, dtype=dtype, device=device) for _ in range(instances)]
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
        list_us = (timed(functools.partial(forced, keeps, keep, guess, ak.GemvPath.LIST), weights_t)
                   if m == 1 else walk_us)
        rows.append(Row(
            shape=shape,
            m=m,
            sparsity=sparsity,
            dense_us=dense_us,
            sparse_us=min(walk_us, list_us),
            fallback_us=timed(functools.partial(forced, keeps, keep, guess, ak.GemvPath.DENSE), weights_t),
            needed=sum(needed_bytes(x, shape, keeps, elem) for x in xs) // instances,
            one_token_walk=m == 1 and walk_us < list_us,
        ))
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
                        + (f"walk={errs[2]:.1e} " if m == 1 else "") + ("ok" if good else "FAIL")
                    )
    return ok


def crossover_table(rows: list[Row], device_name: str) -> CrossoverTable:
    """Per (shape, sparsity): the largest M up to which the sparse path beat the fallback at every
    measured M."""
    shapes = []
    for shape in dict.fromkeys(r.shape for r in rows):
        points = []
        for sparsity in sorted({r.sparsity for r in rows if r.shape == shape}):
            best = 0
            for r in sorted((r for r in rows if r.shape == shape and r.sparsity == sparsity), key=lambda r: r.m):
                if r.sparse_us >= r.fallback_us:
                    break
                best = r.m
            walk = any(r.one_token_walk for r in rows if r.shape == shape and r.sparsity == sparsity)
            points.append(CrossoverPoint(sparsity=sparsity, max_sparse_m=best, one_token_walk=walk))
        shapes.append(ShapeCrossover(name=shape.name, n=shape.n, k=shape.k, points=points))
    return CrossoverTable(device=device_name, shapes=shapes)


def print_tables(rows: list[Row], table: CrossoverTable) -> None:
    print("\n(a) sparse (selection + GEMV) vs dense cuBLAS; TB/s on the bytes the batch must read")
    print(f"{'shape':14s} {'N':>6s} {'K':>6s} {'M':>3s} {'s':>5s} {'dense us':>9s} {'sparse us':>9s} {'path':>4s} "
          f"{'fallbk us':>9s} {'speedup':>7s} {'TB/s':>6s}")
    for r in rows:
        path = "walk" if r.m > 1 or r.one_token_walk else "list"
        print(f"{r.shape.name:14s} {r.shape.n:6d} {r.shape.k:6d} {r.m:3d} {r.sparsity:5.2f} {r.dense_us:9.1f} "
              f"{r.sparse_us:9.1f} {path:>4s} {r.fallback_us:9.1f} {r.speedup:6.2f}x {r.tb_per_s:6.2f}")
    sparsities = sorted({p.sparsity for s in table.shapes for p in s.points})
    print(f"\n(b) crossover on {table.device}: largest M where sparse beats selection + cuBLAS "
          "(w: one token walks all channels)")
    print(f"{'shape':14s} {'N':>6s} {'K':>6s} " + " ".join(f"s={s:.2f}" for s in sparsities))
    for s in table.shapes:
        by_s = {p.sparsity: f"{p.max_sparse_m}{'w' if p.one_token_walk else ''}" for p in s.points}
        print(f"{s.name:14s} {s.n:6d} {s.k:6d} " + " ".join(f"{by_s.get(sp, '-'):>6}" for sp in sparsities))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="13B q/o, gate and down; M 1,4; s 0.5,0.8")
    parser.add_argument("--check", action="store_true", help="full-size correctness pass before timing")
    parser.add_argument("--check-only", action="store_true", help="correctness pass, no timing")
    parser.add_argument("--shapes", nargs="*", help="shape names to run (default: all)")
    parser.add_argument("--ms", type=int, nargs="*", help="batch sizes (default 1 2 4 8 16)")
    parser.add_argument("--sparsities", type=float, nargs="*", help="default 0.5 0.7 0.8 0.9")
    parser.add_argument("--write-crossover", type=Path, nargs="?", const=True,
                        help="write the crossover JSON (default: this GPU's file under kernels/measured/)")
    args = parser.parse_args()

    on_gpu = torch.cuda.is_available()
    device = "cuda" if on_gpu else "cpu"
    dtype = torch.bfloat16 if on_gpu else torch.float16  # bf16 gives NaN in the interpreter
    shapes = (QUICK_SHAPES if args.quick else GPU_SHAPES) if on_gpu else CPU_SHAPES
    if args.shapes:
        shapes = [s for s in GPU_SHAPES + CPU_SHAPES if s.name in args.shapes]
    ms = args.ms or ([1, 4] if args.quick else [1, 2, 4, 8, 16])
    sparsities = args.sparsities or ([0.5, 0.8] if args.quick else [0.5, 0.7, 0.8, 0.9])
    available, reason = ak.kernels_available(device)
    device_name = torch.cuda.get_device_name() if on_gpu else "cpu (Triton interpreter)"
    pdl = "PDL" if select_module.pdl_launch(torch.device(device)) else "no PDL"
    print(f"{device_name}: {reason}; torch {torch.__version__}, triton {triton.__version__}, {dtype}, {pdl}")
    if not available:
        return 1

    torch.manual_seed(0)
    if args.check or args.check_only:
        if not check(shapes, dtype, device):
            print("CHECK FAILED")
            return 1
        print("check passed")
        if args.check_only:
            return 0
    rows = [row for shape in shapes for m in ms for row in measure(shape, m, sparsities, dtype, device)]
    table = crossover_table(rows, device_name)
    print_tables(rows, table)
    if args.write_crossover:
        if args.write_crossover is True:
            args.write_crossover = table_path(CROSSOVER_FILE, device_name)
        args.write_crossover.parent.mkdir(parents=True, exist_ok=True)
        args.write_crossover.write_text(table.model_dump_json(indent=2) + "\n")
        print(f"\nwrote {args.write_crossover}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
