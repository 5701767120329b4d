"""Can an L2 prefetch of its weight speed up the dense fallback's cuBLAS GEMM at decode batches?

    python3 -m benchmarks.experiments.l2_prefetch_probe        # needs CUDA

At 13B qkv and down shapes and M=16, each timed call is: a prefetch kernel (one PTX L2 prefetch per
128-byte line, spread over a program per SM) asking L2 for part of the weight, a ~10 us spin (the
selection's time, in which the prefetch lands), then x @ weight_t. The spin alone is timed and
subtracted, so "gemm" rows are the GEMM's own time with that much of its weight already asked for:
the head (the first rows of [K, N], what a GEMM walking K from 0 reads first) or the heads of 8
equal slices of K (what a split-K GEMM reads first).
Timing: ``benchmarks.common.time_us`` (CUDA graph, L2 flushed, median microseconds per call).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from benchmarks.common import GPU_SHAPES, L2_BYTES, random_inputs, random_instances, time_us

SPIN_CYCLES = 20_000  # ~10 us at an H200's clock
SLICES = 8


@triton.jit
def _prefetch_kernel(ptr, nbytes, BLOCK: tl.constexpr):
    """Ask L2 for this program's share of the ``nbytes`` at ``ptr``, a 128-byte line per element (a
    hint: it writes nothing, so the clamped tail may name its last line twice)."""
    lines = tl.cdiv(nbytes, 128)
    share = tl.cdiv(lines, tl.num_programs(0))
    first = tl.program_id(0).to(tl.int64) * share
    end = tl.minimum(lines, first + share)
    base = ptr.to(tl.pointer_type(tl.int8))
    for start in range(first, end, BLOCK):
        line = tl.minimum(start + tl.arange(0, BLOCK), end - 1)
        tl.inline_asm_elementwise(
            "prefetch.global.L2 [$1]; // $0", "=r,l", [base + line * 128], dtype=tl.int32, is_pure=False, pack=1
        )


def prefetch(head: torch.Tensor) -> None:
    _prefetch_kernel[(torch.cuda.get_device_properties(0).multi_processor_count,)](
        head, head.numel() * head.element_size(), BLOCK=128, num_warps=4
    )


def gemm_after(x: torch.Tensor, weight_t: torch.Tensor, share: float, sliced: bool) -> None:
    """Prefetch ``share`` of L2 of weight_t (its head, or the heads of SLICES slices of K), spin, GEMM."""
    k, n = weight_t.shape
    rows = int(share * L2_BYTES) // (n * weight_t.element_size())
    if sliced:
        for j in range(SLICES):
            start = j * k // SLICES
            prefetch(weight_t[start : start + rows // SLICES])
    elif rows:
        prefetch(weight_t[:rows])
    torch.cuda._sleep(SPIN_CYCLES)
    torch.mm(x, weight_t)


def main() -> None:
    dtype, device, m = torch.bfloat16, "cuda", 16
    print(
        f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, {dtype}, "
        f"M={m}, L2 {L2_BYTES >> 20} MiB: microseconds per call"
    )
    for shape in (s for s in GPU_SHAPES if s.name in ("13b.qkv", "13b.down")):
        _, weights_t = random_instances(shape, dtype, device)
        xs = random_inputs(m, shape.k, len(weights_t), dtype, device)
        spin = time_us([functools.partial(torch.cuda._sleep, SPIN_CYCLES) for _ in xs], xs)
        for sliced, share in [(False, 0.0), (False, 0.25), (False, 0.5), (False, 1.0), (True, 0.5), (True, 1.0)]:
            us = time_us([functools.partial(gemm_after, x, w, share, sliced) for x, w in zip(xs, weights_t)], xs)
            where = f"heads of {SLICES} K slices" if sliced else "head"
            print(
                f"{shape.name:10s} gemm after prefetching {share:4.2f} of L2 ({where:18s}): {us - spin:6.1f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
