"""Measure on this GPU the tiles of the one-token sparse GEMV per shape (7B/13B, or ``--shapes``) and loop (the channel
list, the walk over all channels), against the rule ``plan_gemv`` falls back to, and write the tile
table it reads (kernels/measured/<GPU>/gemv_tiles.json).

The selection is made once, outside the timing: these are GEMV microseconds alone, so they also show
how far each shape's GEMV is from the weight bytes it must read (TB/s on those bytes). The best
tiling of a (shape, loop) is the one with the least time summed over the sparsities.

    python3 -m tools.tune_gemv_tiles --write      # needs CUDA; without --write it only prints
    python3 -m tools.tune_gemv_tiles --launch     # instead: warps x pipeline stages at the 13B list tiles

``--launch`` keeps each 13B shape's measured channel-list tiles and times the launch settings the
tiles do not record, num_warps x num_stages, against the ones every plan uses (4 and 3).
Timing: ``benchmarks.common.time_us``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
from pathlib import Path

import torch

from acttail_kernels.gemv_tiles import TILES_FILE, GemvLoop, GemvTiles, ShapeTiles, TileTable
from acttail_kernels.measured import device_name, table_path
from acttail_kernels.sparse_gemv import RULE_TILES, GemvPlan, plan_gemv, plan_of, sparse_gemv
from acttail_kernels.topk_select import keep_tensor, num_sms, topk_select
from benchmarks.common import keeps_for, random_inputs, random_instances, shapes_of, time_us, write_measured

BLOCK_N = (32, 64, 128)
BLOCK_K = (128, 256, 512)
PROGRAMS_PER_SM = (2, 4, 8)
SPARSITIES = (0.5, 0.8)
WARPS = (2, 4, 8)
STAGES = (2, 3, 4, 5)


def sweep_launch(dtype: torch.dtype, device: str) -> None:
    """Per 13B shape, the list GEMV at its measured tiles with each num_warps x num_stages."""
    sms = num_sms(torch.device(device))
    print(
        f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {dtype}; list GEMV us at M=1, selection "
        f"excluded, s={SPARSITIES}; w(num_warps) s(num_stages) at the measured tiles"
    )
    print(f"{'shape':14s} {'tiles':>12s} {'w4 s3':>11s} {'best':>6s} {'us':>11s}")
    for shape in [s for s in shapes_of("13b") if not s.name.endswith("gate/up")]:
        _, weights_t = random_instances(shape, dtype, device)
        xs = random_inputs(1, shape.k, len(weights_t), dtype, device)
        shipped = plan_gemv(shape.seg_widths, shape.k, device_name(torch.device(device)), sms, GemvLoop.CHANNEL_LIST)
        plans = [dataclasses.replace(shipped, num_warps=w, num_stages=st) for w, st in itertools.product(WARPS, STAGES)]
        timings: dict[GemvPlan, list[float]] = {plan: [] for plan in plans}
        for sparsity in SPARSITIES:
            sels = [topk_select(x, keep_tensor(keeps_for(shape, sparsity), device), with_list=True) for x in xs]
            for plan in plans:
                calls = [
                    functools.partial(sparse_gemv, sel, w, None, shape.seg_bounds, plan)
                    for sel, w in zip(sels, weights_t)
                ]
                timings[plan].append(time_us(calls, [sel.xs for sel in sels]))
        best = min(plans, key=lambda p: sum(timings[p]))
        tiles = f"n{shipped.block_n} k{shipped.block_k} x{shipped.splits}"
        print(
            f"{shape.name:14s} {tiles:>12s} {'/'.join(f'{u:.1f}' for u in timings[shipped]):>11s} "
            f"{f'w{best.num_warps} s{best.num_stages}':>6s} {'/'.join(f'{u:.1f}' for u in timings[best]):>11s}",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--write",
        type=Path,
        nargs="?",
        const=True,
        help="write the table (default: this GPU's file under kernels/measured/)",
    )
    parser.add_argument("--launch", action="store_true", help="instead: num_warps x num_stages at the 13B list tiles")
    parser.add_argument(
        "--shapes",
        nargs="*",
        default=["7b", "13b"],
        help="models whose shapes to measure (benchmarks.common: 7b 13b llama3-8b qwen2.5-7b); "
        "--write keeps the table's other shapes",
    )
    args = parser.parse_args()
    dtype, device = torch.bfloat16, "cuda"
    if args.launch:
        return sweep_launch(dtype, device)
    if args.write is True:
        args.write = table_path(TILES_FILE, torch.cuda.get_device_name())
    sms = num_sms(torch.device(device))
    candidates = [
        GemvTiles(block_n=n, block_k=k, programs_per_sm=p)
        for n, k, p in itertools.product(BLOCK_N, BLOCK_K, PROGRAMS_PER_SM)
    ]
    print(
        f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {dtype}; GEMV us at M=1, selection excluded,"
        f" s={SPARSITIES}; tiles n(columns) k(rows per step) p(programs per SM)"
    )
    print(
        f"{'shape':14s} {'loop':>4s} {'rule':>12s} {'us':>13s} {'TB/s':>11s}   {'best':>12s} {'us':>13s} {'TB/s':>11s}"
    )
    shapes = []
    for shape in [s for s in shapes_of(*args.shapes) if not s.name.endswith("gate/up")]:  # vLLM merges gate and up
        _, weights_t = random_instances(shape, dtype, device)
        xs = random_inputs(1, shape.k, len(weights_t), dtype, device)
        best = {}
        for loop in (GemvLoop.CHANNEL_LIST, GemvLoop.TOKEN_WALK):
            with_list = loop is GemvLoop.CHANNEL_LIST
            timings: dict[GemvTiles, list[float]] = {tiles: [] for tiles in candidates}
            needed = []
            for sparsity in SPARSITIES:
                keeps = keeps_for(shape, sparsity)
                needed.append(2 * sum(keep * w for keep, w in zip(keeps, shape.seg_widths)))
                sels = [topk_select(x, keep_tensor(keeps, device), with_list=with_list) for x in xs]
                for tiles in candidates:
                    plan = plan_of(tiles, shape.seg_widths, sms)
                    calls = [
                        functools.partial(sparse_gemv, sel, w, None, shape.seg_bounds, plan)
                        for sel, w in zip(sels, weights_t)
                    ]
                    timings[tiles].append(time_us(calls, [sel.xs for sel in sels]))
            best[loop] = min(candidates, key=lambda t: sum(timings[t]))

            def fmt(tiles: GemvTiles) -> str:
                us = timings[tiles]
                rate = "/".join(f"{b / u / 1e6:.2f}" for b, u in zip(needed, us))
                tag = f"n{tiles.block_n} k{tiles.block_k} p{tiles.programs_per_sm}"
                return f"{tag:>12s} {'/'.join(f'{u:.1f}' for u in us):>13s} {rate:>11s}"

            print(f"{shape.name:14s} {loop.value:>4s} {fmt(RULE_TILES[loop])}   {fmt(best[loop])}", flush=True)
        shapes.append(
            ShapeTiles(
                name=shape.name,
                seg_widths=list(shape.seg_widths),
                k=shape.k,
                channel_list=best[GemvLoop.CHANNEL_LIST],
                walk=best[GemvLoop.TOKEN_WALK],
            )
        )
    if args.write:
        write_measured(args.write, TileTable(device=torch.cuda.get_device_name(), shapes=shapes))
        print(f"wrote {args.write}")


if __name__ == "__main__":
    main()
