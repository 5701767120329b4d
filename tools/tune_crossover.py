"""Measure on this GPU where the sparse GEMV stops beating dense cuBLAS, and write the crossover table
the dispatch reads (kernels/measured/<GPU>/crossover.json).

    python3 -m tools.tune_crossover --check --write     # needs CUDA; the tiles (tools.tune_gemv_tiles) first
    python3 -m tools.tune_crossover --check --write --shapes llama3-8b qwen2.5-7b   # add those models' shapes

It measures the kernel table of ``benchmarks.bench_kernels`` (same options; printed as (a)) and
derives, per (shape, sparsity), the largest batch up to which selection + sparse GEMV beat
selection + cuBLAS at every measured batch (policy all), the largest up to which they beat cuBLAS
alone (policy auto), and whether one token's walk over all channels beat its channel list (printed
as (b)). Without ``--write`` it only prints. ``--from-output`` derives the table from kernel tables
printed earlier, such as the result files of ``benchmarks/gpu_session.sh kernels``, without a GPU:

    python3 -m tools.tune_crossover --from-output RESULT.txt [...] --device "NVIDIA H200" --write
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from acttail_kernels.crossover import CROSSOVER_FILE, CrossoverPoint, CrossoverTable, ShapeCrossover
from acttail_kernels.measured import device_name, table_path
from benchmarks.bench_kernels import Row, add_table_args, kernel_table
from benchmarks.common import ALL_SHAPES, write_measured


def _largest_m_won(rows: list[Row], rival_us) -> int:
    """The largest M up to which the sparse path beat ``rival_us(row)`` at every measured M (0: not
    at the first)."""
    best = 0
    for r in sorted(rows, key=lambda r: r.m):
        if r.sparse_us >= rival_us(r):
            break
        best = r.m
    return best


def crossover_table(rows: list[Row], device: str) -> CrossoverTable:
    """Per (shape, sparsity): the largest M up to which the sparse path beat the fallback
    (selection + cuBLAS), and cuBLAS alone, at every measured M; and the one-token loop."""
    shapes = []
    for shape in dict.fromkeys(r.shape for r in rows):
        points = []
        for sparsity in sorted({r.sparsity for r in rows if r.shape == shape}):
            at = [r for r in rows if r.shape == shape and r.sparsity == sparsity]
            point = CrossoverPoint(
                sparsity=sparsity,
                max_sparse_m=_largest_m_won(at, lambda r: r.fallback_us),
                max_faster_m=_largest_m_won(at, lambda r: r.dense_us),
                one_token_walk=any(r.one_token_walk for r in at),
            )
            points.append(point)
        shapes.append(ShapeCrossover(name=shape.name, n=shape.n, k=shape.k, points=points))
    return CrossoverTable(device=device, shapes=shapes)


def rows_from_output(text: str, source: str) -> list[Row]:
    """The rows of the kernel tables (a) printed in ``text`` (``print_kernel_table``'s format)."""
    shapes = {s.name: s for s in ALL_SHAPES}
    rows = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) != 11 or fields[0] not in shapes or not fields[9].endswith("x"):
            continue
        name, n, k, m, sparsity, dense_us, sparse_us, path, fallback_us = fields[:9]
        shape = shapes[name]
        if (shape.n, shape.k) != (int(n), int(k)):
            raise ValueError(f"{source}: {name} is {n} x {k} there, {shape.n} x {shape.k} in benchmarks/common.py")
        rows.append(
            Row(
                shape,
                int(m),
                float(sparsity),
                float(dense_us),
                float(sparse_us),
                float(fallback_us),
                needed=0,
                one_token_walk=int(m) == 1 and path == "walk",
            )
        )
    if not rows:
        raise ValueError(f"{source} holds no kernel table (a): give the output of bench_kernels or tune_crossover")
    return rows


def print_crossover(table: CrossoverTable) -> None:
    sparsities = sorted({p.sparsity for s in table.shapes for p in s.points})
    print(
        f"\n(b) crossover on {table.device}: largest M where sparse beats selection + cuBLAS / cuBLAS alone "
        "(w: one token walks all channels)"
    )
    print(f"{'shape':14s} {'N':>6s} {'K':>6s} " + " ".join(f"{f's={s:.2f}':>7s}" for s in sparsities))
    for s in table.shapes:
        by_s = {p.sparsity: f"{p.max_sparse_m}/{p.max_faster_m}{'w' if p.one_token_walk else ''}" for p in s.points}
        print(f"{s.name:14s} {s.n:6d} {s.k:6d} " + " ".join(f"{by_s.get(sp, '-'):>7}" for sp in sparsities))


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
    parser.add_argument(
        "--from-output",
        type=Path,
        nargs="+",
        metavar="FILE",
        help="derive the table from these printed kernel tables instead of measuring (needs --device)",
    )
    parser.add_argument("--device", help="with --from-output: the GPU those tables were measured on")
    args = parser.parse_args()
    if args.from_output:
        if not args.device:
            parser.error('--from-output needs the GPU the tables were measured on: e.g. --device "NVIDIA H200"')
        try:
            rows = [row for path in args.from_output for row in rows_from_output(path.read_text(), str(path))]
        except OSError as error:
            parser.error(f"--from-output {error.filename}: {error.strerror}")
        except ValueError as error:
            parser.error(str(error))
        device = args.device
    else:
        if args.write and not torch.cuda.is_available():
            parser.error("--write needs CUDA: timings under the Triton interpreter mean nothing")
        rows = kernel_table(args)
        if rows is None:
            return 1
        device = device_name(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    table = crossover_table(rows, device)
    print_crossover(table)
    if args.write:
        path = table_path(CROSSOVER_FILE, table.device) if args.write is True else args.write
        try:
            write_measured(path, table)  # keeps the shapes this run did not measure (--shapes)
        except ValueError as error:
            parser.error(str(error))
        print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
