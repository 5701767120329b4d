"""CPU: a linear layer dense, and TopK-sparse through each of the two CPU paths, per step size.

    python3 -m benchmarks.bench_cpu_kernels --dtype bfloat16 --sparsities 0.5,0.8 --rows 1,2,4,8,16,32,64

For SmolLM2-135M's projections (q/o 576 x 576, k/v 192 x 576, gate/up 1536 x 576, down 576 x
1536), Qwen2.5-0.5B's (o 896 x 896, gate/up 4864 x 896, down 896 x 4864) and a 7B one,
microseconds per call (median of ``--repeats`` timed loops): ``dense``, PyTorch's ``F.linear``
(what ActTail runs for a step it leaves dense); ``vllm`` the oneDNN GEMM dense vLLM runs on a
CPU, on its own prepacked copy of the weight (the resident memory that copy adds is printed);
``select`` the exact TopK selection alone; ``gemv`` the selection and the GEMV that reads only the
kept rows (``acttail_kernels.cpu.sparse_gemv``); ``gemm`` the selection and a GEMM of the masked
input (``masked_gemm``). The last column says which path ``acttail_kernels.cpu.sparse_path`` takes
at that step size under policy all (policy auto races the GEMV against vLLM's dense layer at
startup, ``acttail_vllm.serving.cpu_crossover``). Each call's output is checked against the
reference first.
"""

from __future__ import annotations

import argparse
import statistics
import time

import psutil
import torch
import torch.nn.functional as F

from acttail_kernels import cpu, reference

#: (name, N, K): one segment each.
SHAPES = (
    ("smollm2 q/o", 576, 576),
    ("smollm2 k/v", 192, 576),
    ("smollm2 gate/up", 1536, 576),
    ("smollm2 down", 576, 1536),
    ("qwen0.5b o", 896, 896),
    ("qwen0.5b gate/up", 4864, 896),
    ("qwen0.5b down", 896, 4864),
    ("7b q/o", 4096, 4096),
)


def time_us(fn, repeats: int, budget_s: float = 0.05) -> float:
    fn()
    start, loops = time.perf_counter(), 0
    while time.perf_counter() - start < budget_s:
        fn()
        loops += 1
    loops = max(loops, 1)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(loops):
            fn()
        samples.append((time.perf_counter() - start) / loops * 1e6)
    return statistics.median(samples)


def _vllm_gemm():
    """weight [N, K] -> vLLM's CPU GEMM on it (``create_onednn_mm``, as vLLM's unquantized layers use),
    or None without vLLM's CPU ops."""
    try:
        from vllm import _custom_ops as ops
    except ImportError:
        return None
    if not getattr(ops, "_supports_onednn", False):
        return None

    def make(weight: torch.Tensor):
        process = psutil.Process()
        before = process.memory_info().rss
        handler = ops.create_onednn_mm(weight.t(), 32)
        grown = (process.memory_info().rss - before) / 2**20
        size = weight.numel() * weight.element_size() / 2**20
        print(f"# vLLM's oneDNN handler of a {size:.1f} MiB weight: +{grown:.1f} MiB resident")
        return lambda x: ops.onednn_mm(handler, x, None)

    return make


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--sparsities", default="0.5,0.8", type=lambda s: [float(v) for v in s.split(",")])
    parser.add_argument("--rows", default="1,2,4,8,16,32,64", type=lambda s: [int(v) for v in s.split(",")])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, {args.dtype}; microseconds per call")
    vllm_gemm = _vllm_gemm()
    columns = " ".join(f"{name:>9}" for name in ("dense", "vllm", "select", "gemv", "gemm"))
    print(f"{'shape':<16} {'s':>4} {'rows':>4} {columns}  sparse_path")
    for name, n, k in SHAPES:
        weight = torch.randn(n, k, dtype=dtype) / k**0.5
        block = cpu.segment_blocks(cpu.prepare_weight(weight, [0, n]), k, [0, n])[0]
        vllm_linear = vllm_gemm(weight) if vllm_gemm else None
        for sparsity in args.sparsities:
            keep = round(k * (1 - sparsity))
            for rows in args.rows:
                x = torch.randn(rows, k, dtype=dtype)
                expected = reference.sparse_linear_ref(x, weight, None, [0, n], [keep]).float()
                for path in cpu.CpuPath:
                    got = cpu.sparse_linear(x, block.reshape(-1), None, [0, n], [keep], path).float()
                    torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-2)
                dense = time_us(lambda: F.linear(x, weight), args.repeats)
                vllm = time_us(lambda: vllm_linear(x), args.repeats) if vllm_linear else float("nan")
                select = time_us(lambda: cpu.topk_channels(x, keep), args.repeats)
                gemv = time_us(lambda: cpu.sparse_gemv(x, cpu.topk_channels(x, keep), block, None), args.repeats)
                gemm = time_us(
                    lambda: cpu.masked_gemm(x, cpu.channel_mask(cpu.topk_channels(x, keep), k), block, None),
                    args.repeats,
                )
                path = cpu.sparse_path(rows, [keep], [0, n], k)
                times = f"{dense:>9.1f} {vllm:>9.1f} {select:>9.1f} {gemv:>9.1f} {gemm:>9.1f}"
                print(f"{name:<16} {sparsity:>4.2f} {rows:>4} {times}  {path.value}", flush=True)


if __name__ == "__main__":
    main()
