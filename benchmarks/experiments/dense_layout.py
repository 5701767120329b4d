"""The dense GEMM on the kernels' weight layout against vLLM's, at prefill and batched-decode sizes.

ActTail keeps each weight once, re-laid out as [K, N] for the sparse GEMV (``prepare_weight``), so a
step that ``auto`` runs dense multiplies ``x @ Wt`` where dense vLLM runs ``F.linear(x, W)`` on
[N, K]: cuBLAS sees the other operand order. Per shape and token count, microseconds for:

* dense:    F.linear(x, W), W [N, K] (vLLM's unquantized layer);
* dense_t:  x @ Wt, Wt [K, N] (what ActTail's op runs for a step it does not sparsify);
* ratio:    dense_t / dense;

each under every BLAS library torch can pick on the GPU (``torch.backends.cuda.preferred_blas_library``:
cuBLAS, cuBLASLt), since which one a GEMM goes through can matter more than the operand order.

    python3 -m benchmarks.experiments.dense_layout [--models 13b 7b] [--ms 64 256 1024 4096 8192]
    # needs CUDA for GPU numbers (timing: benchmarks.common.time_us); on a CPU it times wall clock
"""

from __future__ import annotations

import argparse
import functools

import torch

from benchmarks.common import random_inputs, random_instances, shapes_of, time_us


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["13b", "7b"])
    parser.add_argument("--ms", type=int, nargs="+", default=[16, 64, 256, 512, 1024, 2048, 4096, 8192])
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(f"{name}, torch {torch.__version__}, {dtype}; microseconds per call")
    libraries = ["cublas", "cublaslt"] if device == "cuda" else ["default"]
    print(f"{'blas':9s} {'shape':14s} {'M':>5s} {'dense':>8s} {'dense_t':>8s} {'ratio':>6s}")
    for library in libraries:
        if device == "cuda":
            torch.backends.cuda.preferred_blas_library(library)
        for shape in shapes_of(*args.models):
            weights, weights_t = random_instances(shape, dtype, device)
            for m in args.ms:
                xs = random_inputs(m, shape.k, len(weights), dtype, device)
                linear = [functools.partial(torch.nn.functional.linear, x, w) for x, w in zip(xs, weights)]
                dense = time_us(linear, xs)
                dense_t = time_us([functools.partial(torch.matmul, x, w) for x, w in zip(xs, weights_t)], xs)
                row = f"{library:9s} {shape.name:14s} {m:5d} {dense:8.1f} {dense_t:8.1f} {dense_t / dense:6.3f}"
                print(row, flush=True)


if __name__ == "__main__":
    main()
