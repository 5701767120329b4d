"""What programmatic dependent launch (PDL) buys one sparse linear call: selection + sparse GEMV at
the 13B shapes, one token, with PDL on and off (``topk_select.USE_PDL``, and ``LIST_PDL`` for
channel lists), alternating ``--rounds`` times
(the two builds of each kernel coexist), so drift between rounds shows as spread, not as a gain.

    python3 benchmarks/pdl_gain.py          # needs a CUDA GPU of compute capability 9.0+; timing as bench_kernels.time_us
"""

from __future__ import annotations

import argparse
import functools
import statistics

import torch
from bench_kernels import GPU_SHAPES, L2_BYTES, keeps_for, time_us

import acttail_kernels as ak
from acttail_kernels import topk_select as select_module
from acttail_kernels.topk_select import keep_tensor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--shapes", nargs="*", default=[s.name for s in GPU_SHAPES if s.name.startswith("13b")])
    args = parser.parse_args()
    dtype, device = torch.bfloat16, "cuda"
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {dtype}; microseconds per call, "
          f"median of {args.rounds} alternating rounds (min-max)")
    print(f"{'shape':14s} {'s':>4s} {'path':>4s} {'no PDL':>17s} {'PDL':>17s}")
    for shape in (s for s in GPU_SHAPES if s.name in args.shapes):
        instances = min(16, max(2, -(-4 * L2_BYTES // (shape.n * shape.k * 2))))
        weights_t = [ak.prepare_weight(torch.randn(shape.n, shape.k, dtype=dtype, device=device) * 0.02)
                     for _ in range(instances)]
        xs = [torch.randn(1, shape.k, dtype=dtype, device=device) for _ in range(instances)]
        for sparsity in (0.5, 0.8):
            keeps = keeps_for(shape, sparsity)
            keep = keep_tensor(keeps, device)
            for path in (ak.GemvPath.LIST, ak.GemvPath.WALK):
                calls = [functools.partial(ak.sparse_linear, x, w, None, shape.seg_bounds, keeps, keep=keep, path=path)
                         for x, w in zip(xs, weights_t)]
                times: dict[bool, list[float]] = {False: [], True: []}
                for _ in range(args.rounds):
                    for pdl in (False, True):
                        select_module.USE_PDL = select_module.LIST_PDL = pdl
                        times[pdl].append(time_us(calls, xs))
                cells = [f"{statistics.median(t):5.1f} ({min(t):4.1f}-{max(t):4.1f})" for t in times.values()]
                print(f"{shape.name:14s} {sparsity:4.2f} {path.value:>4s} {cells[0]:>17s} {cells[1]:>17s}", flush=True)
    select_module.USE_PDL, select_module.LIST_PDL = True, False


if __name__ == "__main__":
    main()
