"""Resident memory of a process after SmolLM2-135M's bf16 layer GEMMs at every row count 1..N, by
how the GEMMs are issued; each way in a fresh process, so no cache is shared.

    python -m benchmarks.experiments.gemm_shape_memory --max-rows 512

- ``exact_rows``: ``torch.nn.functional.linear`` per output segment at the step's own row count;
- ``gemm_rows``: the same with the rows padded to ``gemm_rows`` (``acttail_kernels.cpu.padded_linear``,
  what the ActTail op runs on CPU for the steps its GEMV leaves to a GEMM);
- ``vllm_onednn``: vLLM's dense CPU GEMM, a oneDNN handler per weight (``create_onednn_mm`` with
  the 32 cached row counts ``dispatch_cpu_unquantized_gemm`` asks for);
- ``topk_mask``: the reference's TopK selection alone (a stable sort per row), no GEMM.

Each process runs every row count once, then all again (no new shape), then ``malloc_trim`` (what
glibc holds free but has not returned). Set ``LRU_CACHE_CAPACITY`` (ideep's cache) or
``ONEDNN_PRIMITIVE_CACHE_CAPACITY`` (oneDNN's) before the command to see each cache's share.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import subprocess
import sys
from collections.abc import Callable, Sequence

import psutil
import torch

from acttail_vllm.cli import HelpWithDefaults

HIDDEN, INTERMEDIATE = 576, 1536
#: Each decoder module's input width and output segments (q/k/v, o, gate/up, down).
MODULES = {
    "qkv_proj": (HIDDEN, (576, 192, 192)),
    "o_proj": (HIDDEN, (576,)),
    "gate_up_proj": (HIDDEN, (INTERMEDIATE, INTERMEDIATE)),
    "down_proj": (INTERMEDIATE, (HIDDEN,)),
}
WAYS = ("exact_rows", "gemm_rows", "vllm_onednn", "topk_mask")


def module_call(way: str) -> Callable[[torch.Tensor, torch.Tensor, tuple[int, ...]], torch.Tensor]:
    """(x [M, K], weight [N, K], segment widths) -> what ``way`` computes for that module."""
    from acttail_kernels import cpu, reference

    def per_segment(linear: Callable) -> Callable:
        return lambda x, weight, widths: torch.cat([linear(x, w, None) for w in torch.split(weight, widths)], dim=1)

    if way == "exact_rows":
        return per_segment(torch.nn.functional.linear)
    if way == "gemm_rows":
        return per_segment(lambda x, weight, bias: cpu.padded_linear(x, weight.t(), bias))
    if way == "topk_mask":
        return lambda x, weight, widths: reference.topk_mask(x, x.shape[1] // 2)
    from vllm import _custom_ops as ops

    handlers: dict[int, object] = {}

    def onednn(x: torch.Tensor, weight: torch.Tensor, widths: tuple[int, ...]) -> torch.Tensor:
        if weight.data_ptr() not in handlers:
            handlers[weight.data_ptr()] = ops.create_onednn_mm(weight.t(), 32)
        return ops.onednn_mm(handlers[weight.data_ptr()], x, None)

    return onednn


def measure(way: str, max_rows: int) -> dict[str, float]:
    """MiB resident: at the start, after row counts 1..max_rows, after them all again, after malloc_trim."""
    torch.manual_seed(0)
    process = psutil.Process()
    weights = {name: torch.randn(sum(widths), k, dtype=torch.bfloat16) for name, (k, widths) in MODULES.items()}
    call = module_call(way)

    def step(rows: int) -> None:
        for name, (k, widths) in MODULES.items():
            call(torch.randn(rows, k, dtype=torch.bfloat16), weights[name], widths)

    def rss() -> float:
        return process.memory_info().rss / 2**20

    step(1)
    mib = {"start": rss()}
    for rows in range(1, max_rows + 1):
        step(rows)
    mib["after"] = rss()
    for rows in range(1, max_rows + 1):
        step(rows)
    mib["again"] = rss()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    mib["trimmed"] = rss()
    return mib


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpWithDefaults)
    parser.add_argument("--max-rows", type=int, default=512, help="row counts 1..this")
    parser.add_argument("--ways", nargs="+", choices=WAYS, default=list(WAYS), help="ways to issue the GEMMs")
    parser.add_argument("--one", choices=WAYS, help=argparse.SUPPRESS)  # the child process: measure one way
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(measure(args.one, args.max_rows)))
        return 0
    print(f"resident MiB, GEMMs of SmolLM2-135M's layer at rows 1..{args.max_rows} (bf16, torch {torch.__version__})")
    print(f"{'way':<12} {'start':>6} {'after':>6} {'growth':>7} {'again':>6} {'trimmed':>8}")
    for way in args.ways:
        child = [sys.executable, "-m", __spec__.name, "--one", way, "--max-rows", str(args.max_rows)]
        out = subprocess.run(child, capture_output=True, text=True, check=True).stdout
        mib = json.loads(out.strip().splitlines()[-1])
        print(
            f"{way:<12} {mib['start']:6.0f} {mib['after']:6.0f} {mib['after'] - mib['start']:+7.0f} "
            f"{mib['again']:6.0f} {mib['trimmed']:8.0f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
