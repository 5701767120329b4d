"""What exact TopK selection costs on one GPU, by building block (one bf16 row, one program).

    python3 -m benchmarks.experiments.selection_costs        # needs CUDA

Each variant loads one row of K bf16 activations and then does one kind of step, so the rows of the
output price the blocks a selection kernel is made of: a block-wide count ("steps": 0, 1, 9 or 15
bisection steps over the row held in registers; "ternary": steps that each keep a third of the
range, two counts in one sum; "chunked": bisection steps over the row reloaded in chunks), a 256-bin
`tl.histogram` pass, a scan that lists channels ("list", and the same in two levels: pieces of the
row scanned alone, then their totals), and a range test over 1, 128 or 256 programs; then
``topk_select`` itself, whole. Timing: ``benchmarks.common.time_us`` (CUDA graph, L2 flushed,
median microseconds per call, the input rewrite subtracted).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from acttail_kernels.topk_select import _magnitude_bits, guess_tensor, keep_tensor, topk_select
from benchmarks.common import time_us

KEEP = tl.constexpr(1000)  # any budget: the cost does not depend on it


@triton.jit
def _row_bits(x_ptr, K, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    v = tl.load(x_ptr + offs, mask=offs < K, other=0.0)
    return tl.where(offs < K, _magnitude_bits(v, 15), -1), offs


@triton.jit
def _steps_kernel(x_ptr, out_ptr, K, BLOCK: tl.constexpr, STEPS: tl.constexpr):
    bits, offs = _row_bits(x_ptr, K, BLOCK)
    thr = 0
    for s in tl.static_range(STEPS):
        candidate = thr | (1 << (14 - s))
        thr = tl.where(tl.sum((bits >= candidate).to(tl.int32), axis=0) >= KEEP, candidate, thr)
    tl.store(out_ptr, thr)


@triton.jit
def _ternary_steps_kernel(x_ptr, out_ptr, K, BLOCK: tl.constexpr, STEPS: tl.constexpr):
    """Threshold search in thirds: two counts share one int32 sum, so each step keeps a third of
    [lo, hi) (log2(3) = 1.58 bits) for the latency of one binary step. Invariant: count(>= lo) >=
    KEEP > count(>= hi)."""
    bits, offs = _row_bits(x_ptr, K, BLOCK)
    lo = 0
    hi = 1 << 15
    for _ in tl.static_range(STEPS):
        span = hi - lo
        c1 = lo + span // 3
        c2 = lo + (2 * span) // 3
        counts = tl.sum((bits >= c1).to(tl.int32) + ((bits >= c2).to(tl.int32) << 16), axis=0)
        upper = (counts >> 16) >= KEEP
        middle = (counts & 0xFFFF) >= KEEP
        lo, hi = tl.where(upper, c2, tl.where(middle, c1, lo)), tl.where(upper, hi, tl.where(middle, c2, c1))
    tl.store(out_ptr, lo)


@triton.jit
def _chunked_steps_kernel(x_ptr, out_ptr, K, CHUNK: tl.constexpr, STEPS: tl.constexpr):
    thr = 0
    offs = tl.arange(0, CHUNK)
    for s in tl.static_range(STEPS):
        candidate = thr | (1 << (14 - s))
        count = 0
        for c in range(0, K, CHUNK):
            v = tl.load(x_ptr + c + offs, mask=c + offs < K, other=0.0)
            count += tl.sum((_magnitude_bits(v, 15) >= candidate).to(tl.int32), axis=0)
        thr = tl.where(count >= KEEP, candidate, thr)
    tl.store(out_ptr, thr)


@triton.jit
def _histogram_kernel(x_ptr, out_ptr, K, BLOCK: tl.constexpr, PASSES: tl.constexpr):
    bits, offs = _row_bits(x_ptr, K, BLOCK)
    digit = 0
    for p in tl.static_range(PASSES):
        hist = tl.histogram((bits >> (7 * (1 - p))) & 255, 256, mask=(offs < K) & ((bits >> 8) >= digit))
        at_or_above = tl.sum(hist, axis=0) - tl.cumsum(hist, axis=0) + hist
        digit += tl.sum((at_or_above >= KEEP).to(tl.int32), axis=0)
    tl.store(out_ptr, digit)


@triton.jit
def _list_kernel(x_ptr, idx_ptr, out_ptr, K, BLOCK: tl.constexpr):
    bits, offs = _row_bits(x_ptr, K, BLOCK)
    listed = bits > 0x3C00
    tl.store(idx_ptr + tl.cumsum(listed.to(tl.int32), axis=0) - 1, offs, mask=listed)
    tl.store(out_ptr, tl.sum(listed.to(tl.int32), axis=0))


@triton.jit
def _list_2level_kernel(x_ptr, idx_ptr, out_ptr, K, ROWS: tl.constexpr, COLS: tl.constexpr):
    """The list's scan in two levels: the row as [ROWS, COLS], a scan along each COLS-long piece
    and one over the ROWS piece totals (a short scan instead of one over the whole row)."""
    offs = tl.arange(0, ROWS)[:, None] * COLS + tl.arange(0, COLS)[None, :]
    v = tl.load(x_ptr + offs, mask=offs < K, other=0.0)
    listed = (tl.where(offs < K, _magnitude_bits(v, 15), -1) > 0x3C00).to(tl.int32)
    piece_totals = tl.sum(listed, axis=1)
    piece_starts = tl.cumsum(piece_totals, axis=0) - piece_totals
    slot = piece_starts[:, None] + tl.cumsum(listed, axis=1) - 1
    tl.store(idx_ptr + slot, offs, mask=listed != 0)
    tl.store(out_ptr, tl.sum(piece_totals, axis=0))


@triton.jit
def _range_kernel(x_ptr, out_ptr, K, BLOCK: tl.constexpr):
    part = tl.program_id(0)
    bits, offs = _row_bits(x_ptr, K, BLOCK)
    top = bits >> 7
    counts = tl.sum((top >= part).to(tl.int32) + ((top > part).to(tl.int32) << 16), axis=0)
    if ((counts & 0xFFFF) >= KEEP) & ((counts >> 16) < KEEP):
        tl.store(out_ptr, part)


def main() -> None:
    out = torch.zeros(16, dtype=torch.int32, device="cuda")
    print(f"{torch.cuda.get_device_name()}, triton {triton.__version__}: microseconds per call")
    for k in (5120, 13824):
        rows = [torch.randn(1, k, dtype=torch.bfloat16, device="cuda") for _ in range(8)]
        idx = torch.zeros(k, dtype=torch.int32, device="cuda")
        block = triton.next_power_of_2(k)

        def us(launch) -> str:
            return f"{time_us([functools.partial(launch, x) for x in rows], rows):5.1f}"

        for warps in (4, 8, 16):
            tag = f"K={k} w={warps:2d}"
            steps = [
                us(lambda x, n=n: _steps_kernel[(1,)](x, out, k, block, n, num_warps=warps)) for n in (0, 1, 9, 15)
            ]
            print(f"{tag} steps 0/1/9/15: {steps}")
            ternary = [
                us(lambda x, n=n: _ternary_steps_kernel[(1,)](x, out, k, block, n, num_warps=warps)) for n in (6, 10)
            ]
            print(f"{tag} ternary steps 6/10 (9.5/15.8 bits): {ternary}")
            chunked = [
                us(lambda x, c=c: _chunked_steps_kernel[(1,)](x, out, k, c, 7, num_warps=warps)) for c in (1024, 2048)
            ]
            print(f"{tag} chunked 7 steps, chunk 1024/2048: {chunked}")
            passes = [us(lambda x, p=p: _histogram_kernel[(1,)](x, out, k, block, p, num_warps=warps)) for p in (1, 2)]
            print(f"{tag} histogram passes 1/2: {passes}")
            print(f"{tag} list: {us(lambda x: _list_kernel[(1,)](x, idx, out, k, block, num_warps=warps))}")
            two_level = [
                us(lambda x, c=c: _list_2level_kernel[(1,)](x, idx, out, k, block // c, c, num_warps=warps))
                for c in (32, 64, 128, 256, 512)
            ]
            print(f"{tag} list in two levels, pieces of 32/64/128/256/512: {two_level}")
            ranges = [us(lambda x, g=g: _range_kernel[(g,)](x, out, k, block, num_warps=warps)) for g in (1, 128, 256)]
            print(f"{tag} range test over 1/128/256 programs: {ranges}")
        for m, segs in ((1, 1), (1, 3), (4, 3), (16, 1), (16, 3)):
            xs = [torch.randn(m, k, dtype=torch.bfloat16, device="cuda") for _ in range(8)]
            keep = keep_tensor([k // 5] * segs, "cuda")
            lists = (False, True) if m == 1 else (False,)
            cells = [
                f"{time_us([functools.partial(topk_select, x, keep, w, g) for x in xs], xs):5.1f}"
                for g in (None, guess_tensor(segs, "cuda"))
                for w in lists
            ]
            print(f"K={k} topk_select M={m:2d}, {segs} segments, without/with list; again with a guess: {cells}")


if __name__ == "__main__":
    main()
