"""Exact per-token TopK on chip: x with all but each row's ``keep`` largest |x| zeroed, per segment.

Non-negative floats order like their bit patterns, so the threshold ``thr`` (the bits of the keep-th
largest |x|) is the largest t with count(bits >= t) >= keep, found one bit at a time from the top,
each step a count over the row held in registers. Entries above ``thr`` are kept; among entries equal
to it the lowest indices are kept (a cumulative count), like a stable descending sort.

A step's cost is mostly the latency of one block-wide sum, so the top RANGE_BITS bits are decided in
parallel instead: 2**RANGE_BITS programs per row each own one slice of the threshold range and test
it with a single two-count step; the one program whose slice holds ``thr`` goes on with the
remaining bits and writes the row, the others exit.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .reference import check_keeps

MAX_SEGMENTS = 4  # QKV needs 3, gate_up 2; more segments would need more scalar kernel arguments
MAX_CHANNELS = 32767  # two counts share one int32 sum in the range test
PROGRAMS_PER_SM = 4  # range-test programs to spread over the GPU


def triton_interpreted() -> bool:
    """Whether these kernels were built for Triton's CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return not isinstance(_topk_sparsify_kernel, triton.runtime.JITFunction)


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors to fill (4 under the CPU interpreter: small grids, cheap to run)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def value_bits(dtype: torch.dtype) -> int:
    """Bits of |x| below the sign bit: the bits of a threshold."""
    if dtype in (torch.float16, torch.bfloat16):
        return 15
    if dtype == torch.float32:
        return 31
    raise TypeError(f"sparse kernels take float16, bfloat16 or float32 activations, got {dtype}")


@triton.jit
def _magnitude_bits(v, VALUE_BITS: tl.constexpr):
    """|v| as a non-negative int32 that orders like |v| (sign bit cleared)."""
    if VALUE_BITS == 15:
        bits = v.to(tl.int16, bitcast=True).to(tl.int32) & 0x7FFF
    else:
        bits = v.to(tl.int32, bitcast=True) & 0x7FFFFFFF
    return bits


@triton.jit
def _segment_keep(seg, keep0, keep1, keep2, keep3, NUM_SEGS: tl.constexpr):
    keep = keep0
    if NUM_SEGS > 1:
        keep = tl.where(seg == 1, keep1, keep)
    if NUM_SEGS > 2:
        keep = tl.where(seg == 2, keep2, keep)
    if NUM_SEGS > 3:
        keep = tl.where(seg == 3, keep3, keep)
    return keep


@triton.jit
def _topk_sparsify_kernel(
    x_ptr,
    stride_xm,
    K,
    keep0,
    keep1,
    keep2,
    keep3,
    out_ptr,
    NUM_SEGS: tl.constexpr,
    BLOCK_K: tl.constexpr,
    VALUE_BITS: tl.constexpr,
    RANGE_BITS: tl.constexpr,
):
    """Program (token m, segment, part): if thr lies in part's slice, write out[segment, m, :]."""
    m = tl.program_id(0)
    seg = tl.program_id(1)
    part = tl.program_id(2)
    LOW_BITS: tl.constexpr = VALUE_BITS - RANGE_BITS
    keep = _segment_keep(seg, keep0, keep1, keep2, keep3, NUM_SEGS)
    offs = tl.arange(0, BLOCK_K)
    in_row = offs < K
    v = tl.load(x_ptr + m.to(tl.int64) * stride_xm + offs, mask=in_row, other=0.0)
    bits = tl.where(in_row, _magnitude_bits(v, VALUE_BITS), -1)  # -1: padding never counts

    # thr is in this part's slice [part, part + 1) << LOW_BITS iff count(>= its start) >= keep and
    # count(>= its end) < keep; the end of the last slice is above every value (keep == 0 lands there).
    top = bits >> LOW_BITS
    counts = tl.sum((top >= part).to(tl.int32) + ((top > part).to(tl.int32) << 16), axis=0)
    is_last = part == tl.num_programs(2) - 1
    if ((counts & 0xFFFF) >= keep) & (((counts >> 16) < keep) | is_last):
        thr = part << LOW_BITS
        for step in range(LOW_BITS):
            candidate = thr | (1 << (LOW_BITS - 1 - step))
            count = tl.sum((bits >= candidate).to(tl.int32), axis=0)
            thr = tl.where(count >= keep, candidate, thr)
        # Keep all entries above thr and the first (keep - #above) entries equal to it.
        need = keep - tl.sum((bits > thr).to(tl.int32), axis=0)
        equal = bits == thr
        rank = tl.cumsum(equal.to(tl.int32), axis=0)
        kept = (bits > thr) | (equal & (rank <= need))
        out = out_ptr + (seg.to(tl.int64) * tl.num_programs(0) + m) * K + offs
        tl.store(out, tl.where(kept, v, 0.0), mask=in_row)


def select_config(k: int) -> tuple[int, int]:
    """(BLOCK_K, num_warps): the whole row in one program (4 warps measured best up to 8192)."""
    block_k = triton.next_power_of_2(k)
    return block_k, 8 if block_k > 8192 else 4


def range_bits(rows: int, dtype: torch.dtype, num_sms: int) -> int:
    """Threshold bits to decide by parallel range tests: about PROGRAMS_PER_SM programs per SM."""
    spare = PROGRAMS_PER_SM * num_sms // max(1, rows)
    return min(value_bits(dtype), int(math.log2(spare)) if spare >= 1 else 0)


def topk_sparsify(x: torch.Tensor, seg_keep: list[int], num_sms: int) -> torch.Tensor:
    """[S, M, K]: for each of the S budgets, x [M, K] with all but each row's ``keep`` largest |x|
    zeroed (ties to the lower index). One launch; no host sync."""
    m, k = x.shape
    if not 1 <= len(seg_keep) <= MAX_SEGMENTS:
        raise ValueError(f"1 to {MAX_SEGMENTS} output segments are supported, got {len(seg_keep)}")
    if k > MAX_CHANNELS:
        raise ValueError(f"at most {MAX_CHANNELS} input channels are supported, got {k}")
    check_keeps(k, seg_keep)
    if x.stride(1) != 1:
        x = x.contiguous()
    num_segs = len(seg_keep)
    out = torch.empty(num_segs, m, k, dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    bits = range_bits(m * num_segs, x.dtype, num_sms)
    block_k, num_warps = select_config(k)
    _topk_sparsify_kernel[(m, num_segs, 2**bits)](
        x,
        x.stride(0),
        k,
        *(list(seg_keep) + [0] * (MAX_SEGMENTS - num_segs)),
        out,
        NUM_SEGS=num_segs,
        BLOCK_K=block_k,
        VALUE_BITS=value_bits(x.dtype),
        RANGE_BITS=bits,
        num_warps=num_warps,
    )
    return out
