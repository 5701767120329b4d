"""Host time of ActTail's vLLM op called eagerly, as vLLM calls it outside CUDA graphs (prefills
larger than the largest captured size, ``enforce_eager``), against the dense layer it replaces
(``F.linear`` on vLLM's [N, K] weight): per call, the wall time of a long run of back-to-back calls,
and the GPU time of the same call replayed from a CUDA graph. Where wall exceeds GPU time, the host
is the bottleneck; cProfile then shows where its time goes. The op runs under policy ``auto`` (the
default: a step the sparse GEMV would not speed up runs the dense layer) and ``all`` (every token
sparsified).

    python3 -m benchmarks.host_overhead [--profile 13b.qkv]        # needs CUDA and vLLM
    python3 -m benchmarks.host_overhead --python-only cpu          # the op's own Python, any device
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
from acttail_vllm.serving.op import CallSite, register_call_site, register_sparse_linear_op, sparse_linear_impl
from acttail_vllm.serving.stats import new_stats
from benchmarks.common import keeps_for, random_instances, shapes_of, time_us

SPARSITY = 0.8
CALLS = 300


def eager_us(call, calls: int = CALLS) -> float:
    """Wall microseconds per call over ``calls`` back-to-back calls (a GPU's queue drained at both ends)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else lambda: None
    for _ in range(10):
        call()
    sync()
    start = time.perf_counter()
    for _ in range(calls):
        call()
    sync()
    return (time.perf_counter() - start) * 1e6 / calls


def python_overhead(device: str) -> None:
    """The op's own host time: a 64 x 64 layer, whose GEMM costs next to nothing, called as
    ``F.linear`` and as the op's dense GEMM alone (``x @ weight_t``), through the op's eager route
    (``sparse_linear_impl``, what ``--enforce-eager`` runs) and through the dispatcher (what
    compiled code calls), on the dense route (a step ``auto`` does not sparsify; also counting tokens
    and kept channels, as a CPU's sparsified modules do) and sparsified under policy ``all``."""
    k = n = 64
    weight = torch.randn(n, k, device=device)
    keep, guess = keep_tensor([k // 2], device), guess_tensor(1, device)
    stats = new_stats(1).to(device)
    # A step left dense runs one GEMM: on CUDA x @ weight (weight in the kernel layout), on a CPU the
    # module's dense layer, here that same GEMM.
    weight_t = weight.t().contiguous()

    def dense(x2: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return x2 @ weight_t

    site = CallSite([0, n], [k // 2], False, "auto", 0, dense)  # what compiled code's calls find by `keep`
    register_call_site(keep, site)
    print(f"{device}, torch {torch.__version__}; microseconds per call, 64 x 64 float32 layer, {20 * CALLS} calls")
    for m in (1, 32):
        x = torch.randn(m, k, device=device)

        def call(fn, policy: str, max_tokens: int | None, x=x, counts: bool = False):
            return functools.partial(
                fn, x, weight_t, None, [0, n], [k // 2], keep, guess, stats, counts, policy, max_tokens, dense
            )

        rows = {
            "F.linear": functools.partial(torch.nn.functional.linear, x, weight),
            "x @ weight_t": functools.partial(torch.matmul, x, weight_t),
            "dense route, eager": call(sparse_linear_impl, "auto", 0),
            "dense route, counting": call(sparse_linear_impl, "auto", 0, counts=True),
            "dense route, dispatcher": functools.partial(
                torch.ops.acttail.sparse_linear, x, weight_t, None, keep, guess, stats
            ),
            "sparsified, eager": call(sparse_linear_impl, "all", None),
        }
        for name, fn in rows.items():
            print(f"M={m:3d} {name:24s} {eager_us(fn, 20 * CALLS):7.1f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="13b.qkv", help="shape to run under cProfile (policy all) at each M")
    parser.add_argument("--ms", type=int, nargs="+", default=[1, 16, 64, 512])
    parser.add_argument(
        "--python-only", metavar="DEVICE", help="only the op's own host time on a tiny layer (cpu, cuda)"
    )
    args = parser.parse_args()
    register_sparse_linear_op()
    if args.python_only:
        python_overhead(args.python_only)
        return
    dtype, device = torch.bfloat16, "cuda"
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {dtype}; s = {SPARSITY}, microseconds per call")
    print(
        f"{'shape':14s} {'M':>4s} {'kernel':>6s} | {'auto eager':>10s} {'all eager':>9s} {'dense eager':>11s} | "
        f"{'all graph':>9s} {'dense graph':>11s} | {'auto - dense':>12s}"
    )
    profiles = {}
    for shape in shapes_of("13b"):
        weight_t = random_instances(shape, dtype, device)[1][0]
        weight = weight_t.t().contiguous()  # vLLM's dense layout, [N, K]
        keeps = keeps_for(shape, SPARSITY)
        keep, guess = keep_tensor(keeps, device), guess_tensor(len(keeps), device)
        stats = new_stats(len(keeps)).to(device)
        for m in args.ms:
            x = torch.randn(m, shape.k, dtype=dtype, device=device)

            def op(policy: str, x=x):  # as vLLM's eager forward calls it (no dispatcher)
                return sparse_linear_impl(
                    x, weight_t, None, shape.seg_bounds, keeps, keep, guess, stats, False, policy, None
                )

            auto, every = functools.partial(op, "auto"), functools.partial(op, "all")
            dense = functools.partial(torch.nn.functional.linear, x, weight)
            path = ak.gemv_path(m, shape.n, shape.k, shape.seg_bounds, keeps, x.device)
            auto_us, dense_us = eager_us(auto), eager_us(dense)
            print(
                f"{shape.name:14s} {m:4d} {path.value:>6s} | {auto_us:10.1f} {eager_us(every):9.1f} {dense_us:11.1f} | "
                f"{time_us([every], [x]):9.1f} {time_us([dense], [x]):11.1f} | {auto_us - dense_us:12.1f}",
                flush=True,
            )
            if shape.name == args.profile:
                profiler = cProfile.Profile()
                profiler.enable()
                for _ in range(CALLS):
                    every()
                profiler.disable()
                torch.cuda.synchronize()
                profiles[m] = profiler
    for m, profiler in profiles.items():
        print(f"\ncProfile, {args.profile}, policy all, M = {m}, {CALLS} calls (tottime, cumtime in s):")
        pstats.Stats(profiler).sort_stats("tottime").print_stats(14)


if __name__ == "__main__":
    main()
