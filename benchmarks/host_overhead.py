"""Host time of ``sparse_linear`` called eagerly, as vLLM calls it outside CUDA graphs (prefills
larger than the largest captured size, ``enforce_eager``): per call, the wall time of a long run of
back-to-back calls, against the GPU time of the same call replayed from a CUDA graph. Where wall
exceeds GPU time, the host is the bottleneck; cProfile then shows where its time goes.

    python3 -m benchmarks.host_overhead [--profile 13b.qkv]        # needs CUDA
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import pstats
import time

import torch

import acttail_kernels as ak
from acttail_kernels.topk_select import guess_tensor, keep_tensor
from benchmarks.common import keeps_for, random_instances, shapes_named, time_us

SPARSITY = 0.8
CALLS = 300


def eager_us(call) -> float:
    """Wall microseconds per call over CALLS back-to-back calls (the GPU queue drained at both ends)."""
    for _ in range(10):
        call()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(CALLS):
        call()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e6 / CALLS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="13b.qkv", help="shape to run under cProfile at each M")
    args = parser.parse_args()
    dtype, device = torch.bfloat16, "cuda"
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {dtype}; s = {SPARSITY}, microseconds per call")
    print(f"{'shape':14s} {'M':>3s} {'path':>6s} {'eager':>7s} {'graph':>7s} {'dense eager':>11s} {'dense graph':>11s}")
    profiles = {}
    for shape in shapes_named("13b"):
        weight_t = random_instances(shape, dtype, device)[1][0]
        keeps = keeps_for(shape, SPARSITY)
        keep, guess = keep_tensor(keeps, device), guess_tensor(len(keeps), device)
        for m in (1, 16, 64):
            x = torch.randn(m, shape.k, dtype=dtype, device=device)
            # As the vLLM op calls it: the path picked per call, budgets and guess persistent.
            sparse = functools.partial(ak.sparse_linear, x, weight_t, None, shape.seg_bounds, keeps, keep=keep,
                                       thr_guess=guess)
            dense = functools.partial(torch.mm, x, weight_t)
            path = ak.gemv_path(m, shape.n, shape.k, shape.seg_bounds, keeps, x.device)
            print(f"{shape.name:14s} {m:3d} {path.value:>6s} {eager_us(sparse):7.1f} {time_us([sparse], [x]):7.1f} "
                  f"{eager_us(dense):11.1f} {time_us([dense], [x]):11.1f}", flush=True)
            if shape.name == args.profile:
                profiler = cProfile.Profile()
                profiler.enable()
                for _ in range(CALLS):
                    sparse()
                profiler.disable()
                torch.cuda.synchronize()
                profiles[m] = profiler
    for m, profiler in profiles.items():
        print(f"\ncProfile, {args.profile}, M = {m}, {CALLS} calls (tottime, cumtime in s):")
        pstats.Stats(profiler).sort_stats("tottime").print_stats(14)


if __name__ == "__main__":
    main()
