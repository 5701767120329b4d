"""Compile the sparse GEMV for sm_90 without a GPU and print what the compiler made of each loop:
shared memory, async copies (``cp.async``: software-pipelined loads) and global loads in the PTX.
Catches lowering errors before device time is spent, and shows whether a loop pipelines.

    python3 -m benchmarks.experiments.ptx_check      # any machine with Triton's CUDA backend (ptxas ships with it)

Uses ``triton.compiler.ASTSource``, whose signature format follows the installed Triton.
"""

from __future__ import annotations

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from acttail_kernels.sparse_gemv import COMPACT_BLOCK, _sparse_gemv_kernel

POINTERS = {
    "xs_ptr": "*bf16",
    "idx_ptr": "*i32",
    "xv_ptr": "*bf16",
    "count_ptr": "*i32",
    "thr_ptr": "*fp32",
    "wt_ptr": "*bf16",
    "bias_ptr": "*bf16",
    "out_ptr": "*bf16",
    "partial_ptr": "*fp32",
    "ticket_ptr": "*i32",
}
SCALARS = {name: "i32" for name in ("M", "N", "K", "B1", "B2", "B3", "B4")}
# (name, constexprs): the loops the 13B qkv GEMV runs, with the rule's tiles
VARIANTS = [
    ("channel list", dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, LIST=True, THRESHOLD=False)),
    ("batch walk", dict(BLOCK_M=16, BLOCK_N=128, BLOCK_K=64, LIST=False, THRESHOLD=False)),
    ("threshold token walk", dict(BLOCK_M=1, BLOCK_N=32, BLOCK_K=512, LIST=False, THRESHOLD=True)),
    ("threshold token list", dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, LIST=True, THRESHOLD=True)),
    ("threshold batch walk", dict(BLOCK_M=16, BLOCK_N=128, BLOCK_K=64, LIST=False, THRESHOLD=True)),
]


def main() -> None:
    print(f"triton {triton.__version__}, sm_90, num_warps 4, num_stages 3")
    for name, variant in VARIANTS:
        consts = dict(
            NUM_SEGS=3, HAS_BIAS=False, DOT_PRECISION="tf32", PDL=False, COMPACT_BLOCK=COMPACT_BLOCK, **variant
        )
        types = {**POINTERS, **SCALARS, **{key: "constexpr" for key in consts}}
        signature = {arg: types[arg] for arg in _sparse_gemv_kernel.arg_names}  # in parameter order
        source = ASTSource(
            fn=_sparse_gemv_kernel,
            signature=signature,
            constexprs={(list(signature).index(key),): value for key, value in consts.items()},
        )
        kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": 3})
        ptx = kernel.asm["ptx"]
        print(
            f"{name:22s} shared {kernel.metadata.shared:6d} B, cp.async {ptx.count('cp.async.'):3d}, "
            f"ld.global {ptx.count('ld.global'):4d}"
        )


if __name__ == "__main__":
    main()
