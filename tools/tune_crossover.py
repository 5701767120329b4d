"""Measure on this GPU where the sparse GEMV stops beating dense cuBLAS, and write the crossover table
the dispatch reads (kernels/measured/<GPU>/crossover.json).

    python3 -m tools.tune_crossover --check --write     # needs CUDA; the tiles (tools.tune_gemv_tiles) first
    python3 -m tools.tune_crossover --check --write --shapes llama3-8b qwen2.5-7b   # add those models' shapes

It measures the kernel table of ``benchmarks.bench_kernels`` (same options; printed as (a)) and
derives, per (shape, sparsity), the largest batch up to which selection + sparse GEMV beat
selection + cuBLAS at every measured batch, and whether one token's walk over all channels beat its
channel list (printed as (b)). Without ``--write`` it only prints.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from acttail_kernels.crossover import CROSSOVER_FILE, CrossoverPoint, CrossoverTable, ShapeCrossover
from acttail_kernels.measured import device_name, table_path
from benchmarks.bench_kernels import Row, add_table_args, kernel_table
from benchmarks.common import write_measured


def crossover_table(rows: list[Row], device: str) -> CrossoverTable:
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
    return CrossoverTable(device=device, shapes=shapes)


def print_crossover(table: CrossoverTable) -> None:
    sparsities = sorted({p.sparsity for s in table.shapes for p in s.points})
    print(
        f"\n(b) crossover on {table.device}: largest M where sparse beats selection + cuBLAS "
        "(w: one token walks all channels)"
    )
    print(f"{'shape':14s} {'N':>6s} {'K':>6s} " + " ".join(f"s={s:.2f}" for s in sparsities))
    for s in table.shapes:
        by_s = {p.sparsity: f"{p.max_sparse_m}{'w' if p.one_token_walk else ''}" for p in s.points}
        print(f"{s.name:14s} {s.n:6d} {s.k:6d} " + " ".join(f"{by_s.get(sp, '-'):>6}" for sp in sparsities))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_table_args(parser)
    parser.add_argument(
        "--write",
        type=Path,
        nargs="?",
        const=True,
        help="write the table (default: this GPU's file under kernels/measured/)",
    )
    args = parser.parse_args()
    if args.write and not torch.cuda.is_available():
        parser.error("--write needs CUDA: timings under the Triton interpreter mean nothing")
    rows = kernel_table(args)
    if rows is None:
        return 1
    table = crossover_table(rows, device_name(torch.device("cuda" if torch.cuda.is_available() else "cpu")))
    print_crossover(table)
    if args.write:
        path = table_path(CROSSOVER_FILE, table.device) if args.write is True else args.write
        write_measured(path, table)  # keeps the shapes this run did not measure (--shapes)
        print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
